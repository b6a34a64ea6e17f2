"""The host's conditions during a benchmark, and timing that holds on a shared machine.

A figure is only a result if it holds on a quiet machine: under load, worker threads contend
and whichever side suffers more looks worse. So every benchmark

  * reads the host's load averages, the number of other runnable processes (those, other
    than this one, with a thread in state R) and its core count when it starts and when it
    ends, and prints them as a "host load" row of its table, with a warning row when the
    1-minute load at the start exceeds the core count (at the end the benchmark's own threads
    are in the load, so that figure is printed, not judged);
  * runs the sides it compares interleaved (A B, B A, A B, ...: `interleaved`), and prints
    each figure as its median with min and max over the rounds (`spread`).

The readers take the /proc directory as an argument, so a test can hand them a fake one; off
Linux (no /proc) the load comes from os.getloadavg and the process count is unknown.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

PROC = pathlib.Path("/proc")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The host at one moment: load averages (1, 5, 15 minutes) and the number of other
    runnable processes; None where this platform does not say."""
    load: tuple[float, float, float] | None
    other_runnable: int | None


def parse_loadavg(text: str) -> tuple[tuple[float, float, float], int, int]:
    """(load 1/5/15 min, runnable scheduling entities, all of them) from /proc/loadavg's
    text, e.g. "0.52 0.40 0.31 3/289 10977"."""
    fields = text.split()
    running, total = fields[3].split("/")
    return (float(fields[0]), float(fields[1]), float(fields[2])), int(running), int(total)


def _stat_state(path: pathlib.Path) -> str:
    """The state letter of a /proc/.../stat file: the field after the command name, which is
    in parentheses and may itself hold spaces and parentheses."""
    text = path.read_text()
    return text[text.rindex(")") + 1:].split()[0]


def _runnable_threads(process: pathlib.Path) -> int:
    """How many of a process's threads are runnable (state R); its main thread's state if
    its task directory cannot be read."""
    try:
        tasks = [process / "task" / t / "stat" for t in os.listdir(process / "task")]
    except OSError:
        tasks = [process / "stat"]
    count = 0
    for stat in tasks:
        try:
            count += _stat_state(stat) == "R"
        except (OSError, ValueError, IndexError):  # gone meanwhile, or unreadable
            pass
    return count


def count_other_runnable(proc: pathlib.Path = PROC, pid: int | None = None) -> int | None:
    """The processes other than `pid` (default: this one) with a runnable thread, from
    `proc`'s per-process stat files; if those cannot be listed, /proc/loadavg's count of
    runnable threads less this process's own; None without either."""
    pid = os.getpid() if pid is None else pid
    try:
        names = [n for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        names = []
    others = [n for n in names if int(n) != pid]
    if others:
        return sum(_runnable_threads(proc / n) > 0 for n in others)
    try:
        _, running, _ = parse_loadavg((proc / "loadavg").read_text())
    except (OSError, ValueError, IndexError):
        return None
    own = _runnable_threads(proc / str(pid)) if str(pid) in names else 1
    return max(running - max(own, 1), 0)


def read_snapshot(proc: pathlib.Path = PROC, pid: int | None = None) -> Snapshot:
    """The load averages (from `proc`/loadavg, else os.getloadavg) and other runnable
    processes now."""
    try:
        load, _, _ = parse_loadavg((proc / "loadavg").read_text())
    except (OSError, ValueError, IndexError):
        try:
            load = tuple(os.getloadavg())
        except (OSError, AttributeError):
            load = None
    return Snapshot(load, count_other_runnable(proc, pid))


def core_counts() -> tuple[int, int]:
    """(cores this process may run on, cores of the host)."""
    host = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = host
    return usable, host


def busy_warning(load_1min: float | None, cores: int) -> str | None:
    """The warning line when the 1-minute load exceeds the host's core count, else None."""
    if load_1min is None or not load_1min > cores:
        return None
    return (f"warning: the host was busy (load {load_1min:.2f} > {cores} cores): figures are "
            f"not those of a quiet machine")


class HostConditions:
    """The host's conditions at the start of a benchmark (when built) and at its end (when
    `finish` or `rows` is first called)."""

    def __init__(self, proc: pathlib.Path = PROC, pid: int | None = None,
                 cores: tuple[int, int] | None = None):
        self.proc, self.pid = pathlib.Path(proc), pid
        self.usable_cores, self.cores = cores or core_counts()
        self.start = read_snapshot(self.proc, pid)
        self.end: Snapshot | None = None

    def finish(self) -> HostConditions:
        if self.end is None:
            self.end = read_snapshot(self.proc, self.pid)
        return self

    def warning(self) -> str | None:
        return busy_warning(self.start.load[0] if self.start.load else None, self.cores)

    def rows(self) -> list[tuple[str, str]]:
        """The "host load" row, and a "warning" row when the host was busy."""
        self.finish()

        def load(snap: Snapshot) -> str:
            return "/".join(f"{x:.2f}" for x in snap.load) if snap.load else "unknown"

        def count(n: int | None) -> str:
            return "unknown" if n is None else str(n)

        cores = (f"{self.cores}" if self.usable_cores == self.cores
                 else f"{self.usable_cores} usable of {self.cores}")
        value = (f"load 1/5/15 min: {load(self.start)} (start) / {load(self.end)} (end); "
                 f"other runnable processes: {count(self.start.other_runnable)} (start) / "
                 f"{count(self.end.other_runnable)} (end); cores: {cores}")
        rows = [("host load", value)]
        warning = self.warning()
        if warning:
            rows.append(("warning", warning.removeprefix("warning: ")))
        return rows

    def figures(self) -> dict[str, float]:
        """The conditions as figures (NaN where unknown), for a benchmark's returned dict."""
        self.finish()

        def num(x) -> float:
            return math.nan if x is None else float(x)

        return {
            "host_load_1min_start": num(self.start.load and self.start.load[0]),
            "host_load_1min_end": num(self.end.load and self.end.load[0]),
            "host_other_runnable_start": num(self.start.other_runnable),
            "host_other_runnable_end": num(self.end.other_runnable),
            "host_cores": float(self.cores),
            "host_busy": float(self.warning() is not None),
        }


def interleaved(sides: dict[str, Callable[[], object]], rounds: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Runs every side once per round, in the given order on even rounds and the reverse on
    odd ones (A B, B A, A B, ...), so neither side always goes first and load that comes and
    goes hits them alike. Returns each side's seconds per round. Each side must wait for its
    own work to finish (jax.block_until_ready) before returning."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = clock()
            sides[name]()
            times[name].append(clock() - start)
    return times


def spread(values: Sequence[float], fmt: str = ".3g", unit: str = "") -> str:
    """"median X unit (min Y, max Z, n=N)" of `values`, each number formatted by `fmt`; a
    unit starting with "%" or "x" follows the number without a space."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return "no values"
    unit = f" {unit}" if unit and not unit.startswith(("%", "x")) else unit
    return (f"median {format(float(np.median(values)), fmt)}{unit} "
            f"(min {format(float(values.min()), fmt)}, max {format(float(values.max()), fmt)}, "
            f"n={values.size})")


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of `values`."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values)), float(values.min()), float(values.max())


def median_min_max(name: str, values: Sequence[float]) -> dict[str, float]:
    """{name: median, name_min: min, name_max: max} of `values`, for a returned figures dict."""
    median, low, high = summary(values)
    return {name: median, f"{name}_min": low, f"{name}_max": high}
