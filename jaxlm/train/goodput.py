"""Where a run's wall time went (goodput accounting), one process at a time.

The account splits this attempt's wall time, from the start of `jaxlm train` to its end, on
the host's timeline into parts that add up to it:

    startup     mesh, the run's checks, data set-up, restoring or initialising the state
    compile     the training step, compiled ahead of time
    data        waiting for the next batch (the input pipeline behind the step)
    step        productive steps: dispatching them and waiting for their results
    recompute   steps done again after a resume (the previous attempt had reached them
                but not saved them): time lost to the restart
    checkpoint  the blocking part of saves (the copy to host; writing is asynchronous)
    eval        in-loop evaluation
    other       the rest: logging, progress, the loop's own bookkeeping

goodput = step / wall. A resumed attempt knows how far the one before it got from the rows
it supersedes in metrics.jsonl (jaxlm.train.metrics): `lost_steps` is how many steps it
redoes, `lost_before_s` what they had cost the attempt before. Every log row of
metrics.jsonl carries the account so far, and an attempt that reaches its last step appends
its whole account to <workdir>/goodput.jsonl (one line per attempt: its first and last
step and the figures). With several processes each process's account is gathered at the
log points (where the processes sync anyway): the mean of each part, the lowest goodput
(`goodput_min`) and the longest data wait (`time_data_max_s`).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
from typing import Any, Iterator

import numpy as np

PARTS = ("startup", "compile", "data", "step", "recompute", "checkpoint", "eval")


class Account:
    """Seconds per part since `start` (time.perf_counter()); `other` is the remainder."""

    def __init__(self, start: float):
        self.start = start
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.lost_steps = 0
        self.lost_before_s = 0.0

    @contextlib.contextmanager
    def timing(self, part: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - begin

    def since_start(self, part: str) -> None:
        """Everything since the start not yet accounted for goes to `part` (startup)."""
        self.seconds[part] += max(self.vector(time.perf_counter())[-1], 0.0)

    def vector(self, now: float) -> np.ndarray:
        """[each part of PARTS, wall, other] (seconds): what processes gather."""
        parts = np.asarray([self.seconds[p] for p in PARTS])
        wall = now - self.start
        return np.concatenate([parts, [wall, wall - parts.sum()]])

    def set_lost(self, lost_steps: int, lost_before_s: float) -> None:
        self.lost_steps, self.lost_before_s = int(lost_steps), float(lost_before_s)


def figures(vectors: np.ndarray, lost_steps: int, lost_before_s: float) -> dict[str, float]:
    """The metrics row's account from every process's `Account.vector` (P x parts)."""
    vectors = np.atleast_2d(vectors)
    mean = vectors.mean(axis=0)
    names = [*PARTS, "wall", "other"]
    out: dict[str, Any] = {f"time_{n}_s": float(v) for n, v in zip(names, mean)}
    out = {"wall_s": out.pop("time_wall_s"), **out}
    step, wall = vectors[:, PARTS.index("step")], vectors[:, len(PARTS)]
    goodput = step / np.maximum(wall, 1e-9)
    out["goodput"] = float(goodput.mean())
    if len(vectors) > 1:
        out["goodput_min"] = float(goodput.min())
        out["time_data_max_s"] = float(vectors[:, PARTS.index("data")].max())
    out.update(lost_steps=lost_steps, lost_before_s=lost_before_s)
    return out


def lost_to_restart(superseded: list[dict[str, Any]], resumed_step: int | None
                    ) -> tuple[int, float]:
    """(steps the attempt before reached beyond the checkpoint this one starts from, what
    they cost it) from the training rows of metrics.jsonl this resume superseded: each row
    carries the mean step time since the row before it."""
    rows = sorted((r for r in superseded if isinstance(r.get("step"), int)
                   and "step_time_s" in r), key=lambda r: r["step"])
    previous = resumed_step or 0
    lost_s = 0.0
    for row in rows:
        lost_s += float(row["step_time_s"]) * (row["step"] - previous)
        previous = row["step"]
    return previous - (resumed_step or 0), lost_s


def append(workdir: pathlib.Path, row: dict[str, Any]) -> None:
    """One attempt's account as a line of <workdir>/goodput.jsonl."""
    with open(workdir / "goodput.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def summary(row: dict[str, float]) -> str:
    """The line printed at the end of a run."""
    def s(key: str) -> str:
        return f"{row[key]:.1f}s"

    line = (f"goodput {100 * row['goodput']:.1f}% of {s('wall_s')} wall: step {s('time_step_s')}"
            f", compile {s('time_compile_s')}, startup {s('time_startup_s')}, "
            f"data wait {s('time_data_s')}, checkpoint {s('time_checkpoint_s')}, "
            f"eval {s('time_eval_s')}, recompute {s('time_recompute_s')}, "
            f"other {s('time_other_s')}")
    if row["lost_steps"]:
        line += (f"; {row['lost_steps']} step(s) lost to the restart (they had taken "
                 f"{row['lost_before_s']:.1f}s)")
    if "goodput_min" in row:
        line += f"; lowest process goodput {100 * row['goodput_min']:.1f}%"
    return line
