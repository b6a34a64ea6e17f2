"""`jaxlm bench checkpoint`: training throughput with a checkpoint saved every step against
none, and the time to restore a state against the time to read its files.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time

import jax
import ml_collections

from jaxlm.bench.conditions import HostConditions, interleaved, median_min_max, spread
from jaxlm.bench.step import BenchRun
from jaxlm.bench.table import print_table
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.train.lm import CausalLM


def bench_checkpoint(cfg: ml_collections.ConfigDict, steps: int = 5, rounds: int = 2,
                     directory: str | None = None) -> dict[str, float]:
    """Training throughput with a checkpoint saved every step against none, and the time to
    restore the state against the time to read its files.

    Both loops (`rounds` of `steps` steps each, interleaved: the order swapped every round)
    run the real step; the saving loop does what `jaxlm train` does at a save point (wait for
    the step, start an asynchronous save) and includes the wait for the last save to finish.
    The files are read (and restored) from the page cache, which is how a restore right after
    a save, or from a fast local disk, sees them.
    """
    host = HostConditions()
    run = BenchRun(CausalLM(cfg))
    cfg = run.cfg
    jax.block_until_ready(run.step())  # warm

    def timed_steps(save) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            out = run.step()
            if save is not None:
                save(out)
        jax.block_until_ready(run.state)
        if save is not None:
            checkpointer.wait()
        return time.perf_counter() - start

    root = pathlib.Path(tempfile.mkdtemp(prefix="jaxlm-bench-ckpt-", dir=directory))
    step_number = iter(range(1, 1 << 30))
    ckpt_cfg = cfg.checkpoint.copy_and_resolve_references()
    ckpt_cfg.update(every=1, every_minutes=0.0, keep=2, keep_period=0)
    checkpointer = checkpoint_lib.Checkpointer(root, ckpt_cfg)
    metadata = checkpoint_lib.run_metadata(cfg, run.task.spec.axes["params"], "synthetic")

    def save(out: dict) -> None:
        jax.block_until_ready(out["loss"])  # the loop reads the step's metrics at a save
        checkpointer.save(next(step_number), run.state, {"synthetic": True}, metadata)

    try:
        # Interleaved rounds, so load that comes and goes on the host hits both loops alike.
        times = interleaved({"no saves": lambda: timed_steps(None),
                             "saves": lambda: timed_steps(save)}, rounds)
        no_save_times, save_times = times["no saves"], times["saves"]
        step_dir = checkpointer.directory / str(checkpointer.latest_step())
        files = [p for p in step_dir.rglob("*") if p.is_file()]

        nbytes = sum(p.stat().st_size for p in files)

        def restore() -> None:
            restored, _, _ = checkpointer.restore(checkpointer.latest_step(), run.task.spec.abstract)
            jax.block_until_ready(restored)

        # From disk (the files evicted from the page cache first), then from the cache.
        read_times = {"disk": _timed(_evict_then(files, _read_all)),
                      "cache": _timed(lambda: _read_all(files))}
        restore_times = {"disk": _timed(_evict_then(files, lambda _: restore())),
                         "cache": _timed(restore)}
    finally:
        checkpointer.close()
        shutil.rmtree(root, ignore_errors=True)

    state_bytes = checkpoint_lib.state_nbytes(run.task.spec.abstract)
    tokens = steps * run.tokens_per_step  # per round
    no_save_rates = [tokens / t for t in no_save_times]
    save_rates = [tokens / t for t in save_times]
    ratios = [a / b for a, b in zip(no_save_times, save_times)]  # per round: paired
    figures = {"state_bytes": float(state_bytes), "file_bytes": float(nbytes),
               **median_min_max("tokens_per_sec_no_saves", no_save_rates),
               **median_min_max("tokens_per_sec_save_every_step", save_rates),
               **median_min_max("throughput_ratio", ratios),
               **{f"read_{k}_s": v for k, v in read_times.items()},
               **{f"restore_{k}_s": v for k, v in restore_times.items()},
               **{f"restore_over_read_{k}": restore_times[k] / read_times[k] for k in read_times},
               **host.figures()}
    print_table([
        ("config", f"{cfg.model.family} d={cfg.model.d_model} L={cfg.model.n_layers} "
                   f"seq={cfg.data.seq_len} batch={cfg.data.global_batch_size}"),
        ("timed", f"{rounds} rounds x {steps} steps without saves and with a save every step, "
                  f"interleaved"),
        ("state (arrays / files)", f"{state_bytes / 2**20:,.1f} MiB / {nbytes / 2**20:,.1f} MiB "
                                   f"in {len(files)} files"),
        ("tokens/s, no saves", spread(no_save_rates, ",.0f")),
        ("tokens/s, save every step", spread(save_rates, ",.0f")),
        ("throughput with saves", spread([100 * r for r in ratios], ".1f", "% of no saves")),
        *[row for where in ("disk", "cache") for row in (
            (f"read the files ({where})", f"{read_times[where]:.3f} s "
                                          f"({nbytes / read_times[where] / 2**20:,.0f} MiB/s)"),
            (f"restore, fingerprints checked ({where})", f"{restore_times[where]:.3f} s "
                                                         f"= {figures[f'restore_over_read_{where}']:.2f}x the read"))],
        *host.rows(),
    ])
    return figures


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _read_all(files) -> int:
    return sum(len(p.read_bytes()) for p in files)


def _evict_then(files, fn):
    """`fn(files)` after dropping the files from the page cache (no root needed), so they
    are read from the disk."""

    def run():
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return fn(files)
    return lambda: run()
