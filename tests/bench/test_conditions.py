"""The host conditions every benchmark prints, read from a fake /proc; the interleaved timing
and the median/min/max formatting they print their figures with."""

import itertools
import math
import pathlib

import numpy as np
import pytest

from jaxlm.bench import conditions
from jaxlm.bench.table import print_table

OWN_PID = 100


def write_stat(path: pathlib.Path, pid: int, comm: str, state: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194560 0 0 0 0 1 2 0 0 20 0\n")


def fake_proc(root: pathlib.Path, loadavg: str = "2.50 1.25 0.75 6/289 10977\n") -> pathlib.Path:
    """Processes: this one (two runnable threads, not counted); 200, runnable main thread;
    300, sleeping main thread but one runnable worker; 400, all asleep; 500, a name with a
    space and parentheses, runnable, without a task directory; 600, zombie."""
    (root / "loadavg").parent.mkdir(parents=True, exist_ok=True)
    (root / "loadavg").write_text(loadavg)
    threads = {OWN_PID: [("python", "R"), ("python", "R")],
               200: [("torch", "R")],
               300: [("jax", "S"), ("jax", "S"), ("jax-worker", "R")],
               400: [("sleepy", "S"), ("sleepy", "D")]}
    for pid, states in threads.items():
        write_stat(root / str(pid) / "stat", pid, states[0][0], states[0][1])
        for i, (comm, state) in enumerate(states):
            write_stat(root / str(pid) / "task" / str(pid + i) / "stat", pid + i, comm, state)
    write_stat(root / "500" / "stat", 500, "odd) name (R", "R")
    write_stat(root / "600" / "stat", 600, "gone", "Z")
    (root / "self").mkdir()  # not a process directory
    return root


def test_parse_loadavg():
    load, running, total = conditions.parse_loadavg("0.52 0.40 0.31 3/289 10977\n")
    assert load == (0.52, 0.40, 0.31) and (running, total) == (3, 289)


def test_counts_other_processes_with_a_runnable_thread(tmp_path):
    proc = fake_proc(tmp_path)
    # 200 (main thread), 300 (a worker thread), 500 (stat only, odd name); not this one
    assert conditions.count_other_runnable(proc, pid=OWN_PID) == 3
    assert conditions.count_other_runnable(proc, pid=200) == 3  # now 100 counts, 200 not
    snap = conditions.read_snapshot(proc, pid=OWN_PID)
    assert snap == conditions.Snapshot((2.5, 1.25, 0.75), 3)


def test_without_process_directories_the_loadavg_count_less_our_own_threads(tmp_path):
    (tmp_path / "loadavg").write_text("1.00 1.00 1.00 6/289 10977\n")
    assert conditions.count_other_runnable(tmp_path, pid=OWN_PID) == 5  # 6 less the reader
    write_stat(tmp_path / str(OWN_PID) / "task" / "100" / "stat", 100, "python", "R")
    write_stat(tmp_path / str(OWN_PID) / "task" / "101" / "stat", 101, "python", "R")
    assert conditions.count_other_runnable(tmp_path, pid=OWN_PID) == 4


def test_without_proc_the_count_is_unknown_and_the_load_from_the_os(tmp_path):
    snap = conditions.read_snapshot(tmp_path / "missing", pid=OWN_PID)
    assert snap.other_runnable is None
    if hasattr(conditions.os, "getloadavg"):
        assert snap.load == pytest.approx(conditions.os.getloadavg(), abs=1.0)


@pytest.mark.parametrize("load, cores, warned", [(2.01, 2, True), (2.0, 2, False),
                                                 (0.3, 2, False), (9.5, 8, True),
                                                 (None, 2, False)])
def test_the_warning_appears_exactly_when_the_load_exceeds_the_cores(load, cores, warned):
    warning = conditions.busy_warning(load, cores)
    assert (warning is not None) == warned
    if warned:
        assert warning == (f"warning: the host was busy (load {load:.2f} > {cores} cores): "
                           f"figures are not those of a quiet machine")


def test_rows_and_figures_of_a_busy_host(tmp_path, capsys):
    proc = fake_proc(tmp_path)
    host = conditions.HostConditions(proc, pid=OWN_PID, cores=(2, 2))
    (proc / "loadavg").write_text("3.00 1.50 0.80 2/289 10977\n")
    (proc / "200" / "task" / "200" / "stat").write_text("200 (torch) S 1 200\n")
    rows = host.rows()
    assert rows[0] == ("host load", ("load 1/5/15 min: 2.50/1.25/0.75 (start) / 3.00/1.50/0.80 "
                                     "(end); other runnable processes: 3 (start) / 2 (end); "
                                     "cores: 2"))
    assert rows[1] == ("warning", ("the host was busy (load 2.50 > 2 cores): figures are not "
                                   "those of a quiet machine"))
    figures = host.figures()
    assert figures == {"host_load_1min_start": 2.5, "host_load_1min_end": 3.0,
                       "host_other_runnable_start": 3.0, "host_other_runnable_end": 2.0,
                       "host_cores": 2.0, "host_busy": 1.0}
    print_table([("figure", "1"), *rows])
    assert "warning    the host was busy" in capsys.readouterr().out


def test_a_quiet_host_has_no_warning_row(tmp_path):
    proc = fake_proc(tmp_path, loadavg="0.10 0.20 0.30 1/289 10977\n")
    host = conditions.HostConditions(proc, pid=OWN_PID, cores=(2, 4))
    rows = host.rows()
    assert [k for k, _ in rows] == ["host load"]
    assert rows[0][1].endswith("cores: 2 usable of 4")
    assert host.figures()["host_busy"] == 0.0


def test_unknown_conditions_print_as_unknown(tmp_path):
    host = conditions.HostConditions(tmp_path / "missing", pid=OWN_PID, cores=(2, 2))
    host.start = host.end = conditions.Snapshot(None, None)
    assert host.rows() == [("host load", ("load 1/5/15 min: unknown (start) / unknown (end); "
                                          "other runnable processes: unknown (start) / unknown "
                                          "(end); cores: 2"))]
    assert math.isnan(host.figures()["host_load_1min_start"])


@pytest.mark.parametrize("names", [["A", "B"], ["A", "B", "C"]])
def test_interleaved_alternates_the_order_every_round(names):
    calls = []
    ticks = itertools.count()
    sides = {name: (lambda name=name: calls.append(name)) for name in names}
    times = conditions.interleaved(sides, rounds=5, clock=lambda: float(next(ticks)))
    forward, backward = names, names[::-1]
    assert calls == forward + backward + forward + backward + forward
    assert list(times) == names
    assert all(times[name] == [1.0] * 5 for name in names)  # each call one tick of the clock


def test_interleaved_times_each_call():
    times = conditions.interleaved({"a": lambda: None}, rounds=3)
    assert len(times["a"]) == 3 and all(t >= 0 for t in times["a"])


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0], [0.5, 4.0, 1.5, 2.5], [7.25]])
def test_spread_formats_median_min_max_as_numpy_computes_them(values):
    expected = (f"median {np.median(values):.3f} ms (min {np.min(values):.3f}, "
                f"max {np.max(values):.3f}, n={len(values)})")
    assert conditions.spread(values, ".3f", "ms") == expected
    assert conditions.summary(values) == (np.median(values), np.min(values), np.max(values))


def test_spread_default_format_and_no_values():
    assert conditions.spread([0.0123, 0.011, 0.02]) == "median 0.0123 (min 0.011, max 0.02, n=3)"
    assert conditions.spread([]) == "no values"
    assert conditions.spread([2.0, 1.0], ".1f", "x") == "median 1.5x (min 1.0, max 2.0, n=2)"
    assert (conditions.spread([76.25], ".1f", "% of no saves")
            == "median 76.2% of no saves (min 76.2, max 76.2, n=1)")
