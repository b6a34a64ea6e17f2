"""What a run reports: MFU's peak FLOP/s, the metrics writers (JSONL, TensorBoard) and the
progress line.

MFU = model FLOPs per step (the task's analytic count, jaxlm.model.counts) / step time /
the devices' peak FLOP/s: the chip table's data-sheet figure (jaxlm.parallel.topology),
`metrics.peak_flops` if set, or on CPU the host's float32 matmul throughput measured once
at start-up.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm.errors import UserError
from jaxlm.parallel import topology
from jaxlm.train import wandb_writer


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Float32 matmul FLOP/s of this host, the best of `repeats` n x n x n products."""
    device = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_flops(configured_per_device: float = 0.0) -> tuple[float, str]:
    """Total peak FLOP/s of all devices and where the figure comes from.

    On CPU the simulated devices share one host, so the peak is the host's measured matmul
    throughput, whatever the device count."""
    devices = jax.devices()
    if configured_per_device > 0:
        per_device = configured_per_device
        if devices[0].platform == "cpu":
            return per_device, "config (host total)"
        return per_device * len(devices), "config"
    if devices[0].platform == "cpu":
        return measure_matmul_flops(), "measured float32 matmul"
    kind = devices[0].device_kind
    chip = topology.chip_of(kind)
    if chip is None:
        raise UserError(f"no peak FLOP/s known for device kind {kind!r}: set "
                        f"config.metrics.peak_flops")
    return chip.peak_flops * len(devices), f"{kind} data sheet"


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and the same scalars to
    TensorBoard and, with metrics.wandb, Weights & Biases (jaxlm.train.wandb_writer). Only
    the writing process (process 0) creates files.

    One row per step, whatever was interrupted: a run resumed from step S first moves the
    rows past S (logged after the checkpoint it resumes from) to metrics.superseded.jsonl,
    each marked with the step the run went back to, and TensorBoard hides events from
    step S + 1 on (its purge_step); a run starting from scratch supersedes every row."""

    def __init__(self, workdir: str | pathlib.Path, metrics_cfg: ml_collections.ConfigDict,
                 active: bool, resumed_step: int | None = None,
                 run_config: Mapping[str, Any] | None = None):
        self.active = active
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self.superseded: list[dict[str, Any]] = []  # the rows this start moved aside
        if not active:
            return
        workdir = pathlib.Path(workdir)
        path = workdir / "metrics.jsonl"
        self.superseded = supersede_rows(path, resumed_step)
        self._jsonl = open(path, "a", buffering=1)
        try:
            if metrics_cfg.tensorboard:
                from tensorboardX import SummaryWriter
                purge = None if resumed_step is None else resumed_step + 1
                if purge is None and (workdir / "tensorboard").is_dir():
                    purge = 0  # a fresh start over an earlier attempt's events
                self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)
            if metrics_cfg.wandb:
                self._wandb = wandb_writer.WandbWriter(workdir, metrics_cfg, run_config or {},
                                                       resumed_step)
        except BaseException:
            self.close()  # what was opened before the failure
            raise

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.write(step, scalars)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def supersede_rows(path: pathlib.Path, resumed_step: int | None) -> list[dict[str, Any]]:
    """Moves the rows of `path` logged after `resumed_step` (all rows when None) to
    `<name>.superseded.jsonl` beside it; returns them (parsed). The superseded rows are
    appended and synced before `path` is atomically replaced, so a crash in between at
    worst copies them twice."""
    if not path.exists():
        return []
    kept, dropped = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None  # a torn last line (a kill mid-write): superseded
        keep = resumed_step is not None and isinstance(step, int) and step <= resumed_step
        (kept if keep else dropped).append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return []
    backup = path.with_suffix(".superseded.jsonl")
    rows = []
    with open(backup, "a", encoding="utf-8") as f:
        for line in dropped:
            try:
                row = json.loads(line)
            except ValueError:
                row = {"unparsed": line.rstrip("\n")}
            rows.append(row)
            f.write(json.dumps({**row, "superseded_by_resume_from": resumed_step or 0}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return rows


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(step: int, total: int, scalars: Mapping[str, float], eta_s: float) -> str:
    """One line per logged step, the same for every task: loss (and accuracy where the
    task reports it), throughput, MFU, learning rate (and epoch where the data has one; the
    latest evaluation's loss once there is one)."""
    parts = [f"step {step}/{total}", f"loss {scalars['loss']:.4f}"]
    if "accuracy" in scalars:
        parts.append(f"acc {scalars['accuracy']:.3f}")
    parts += [f"tok/s {scalars['tokens_per_sec']:,.0f}", f"MFU {100 * scalars['mfu']:.1f}%",
              f"lr {scalars['learning_rate']:.2e}"]
    if "epoch" in scalars:
        parts.append(f"epoch {scalars['epoch']:.2f}")
    if "eval_loss" in scalars:
        parts.append(f"eval {scalars['eval_loss']:.4f}")
    parts.append(f"ETA {format_duration(eta_s)}" if math.isfinite(eta_s) else "ETA --")
    return "  ".join(parts)


class Eta:
    """Time left from the recent pace: the last `window` log intervals, so start-up (the
    first step's loader warm-up) and a changing pace weigh only while they are recent."""

    def __init__(self, total_steps: int, window: int = 4):
        self.total_steps = total_steps
        self._marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=window + 1)

    def at(self, step: int, now: float) -> float:
        """Seconds left after `step`, logged at time `now` (perf_counter)."""
        self._marks.append((step, now))
        first_step, first_time = self._marks[0]
        if step == self.total_steps:
            return 0.0
        if step == first_step:  # the run's first logged step: nothing to measure yet
            return math.nan
        return (now - first_time) / (step - first_step) * (self.total_steps - step)


def print_event(line: str, active: bool) -> None:
    """A line between progress lines (a checkpoint saved): on a terminal it replaces the
    live progress line, which the next log draws again below it."""
    if not active:
        return
    print(("\r\033[K" if sys.stdout.isatty() else "") + line, flush=True)


def print_progress(line: str, active: bool) -> None:
    """A live line on a terminal; one line per log otherwise (files, CI)."""
    if not active:
        return
    if sys.stdout.isatty():
        print("\r\033[K" + line, end="", flush=True)
    else:
        print(line, flush=True)
