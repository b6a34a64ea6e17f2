"""`jaxlm bench step`: the training step's speed on synthetic batches, as printed figures.

The step is the real one (same state, sharding, jit and donation as `jaxlm train`); only the
input is synthetic, so the figures measure the model and framework, not the loader.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm import metrics as metrics_lib
from jaxlm import sharding
from jaxlm.data import tokenizers
from jaxlm.model.transformer import param_count
from jaxlm.train import state as state_lib
from jaxlm.train import step as step_lib


def synthetic_batch(global_batch: int, seq_len: int, vocab: int, mesh, seed: int = 0) -> dict:
    """Random tokens, one document per row, every target counted."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(global_batch, seq_len + 1), dtype=np.int32)
    host = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((global_batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (global_batch, seq_len)),
        "weights": np.ones((global_batch, seq_len), np.float32),
    }
    return {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host.items()}


class _BenchRun:
    """The real compiled step (same state, sharding, jit and donation as `jaxlm train`) on a
    synthetic batch; `compile_s` and `first_step_s` are measured while it is built."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        config_lib.validate(cfg, jax.device_count())
        self.cfg = cfg = config_lib.resolved(cfg, tokenizers.load_tokenizer(cfg.data).vocab_size,
                                             jax.device_count())
        self.mesh = mesh = sharding.make_mesh(cfg.mesh)
        batch_size, seq_len = cfg.data.global_batch_size, cfg.data.seq_len
        with jax.set_mesh(mesh), sharding.axis_rules():
            trainer = step_lib.build_trainer(cfg.model, cfg.optim, cfg.train.steps, mesh,
                                             cfg.train.seed)
            self.spec = trainer.spec
            self.state = state_lib.init_state(cfg.model, trainer.tx, self.spec, seed=cfg.train.seed)
            self.batch = synthetic_batch(batch_size, seq_len, cfg.model.vocab_size, mesh)
            jax.block_until_ready((self.state, self.batch))
            start = time.perf_counter()
            self.compiled = trainer.step.lower(
                self.spec.abstract, step_lib.abstract_batch(batch_size, seq_len, mesh)).compile()
            self.compile_s = time.perf_counter() - start
            self.out = self.step()
            jax.block_until_ready(self.out)
            self.first_step_s = time.perf_counter() - start
        self.tokens_per_step = batch_size * seq_len

    def step(self) -> dict:
        self.state, self.out = self.compiled(self.state, self.batch)
        return self.out


def bench_step(cfg: ml_collections.ConfigDict, steps: int = 5) -> dict[str, float]:
    run = _BenchRun(cfg)
    cfg, mesh = run.cfg, run.mesh
    seq_len, batch_size = cfg.data.seq_len, cfg.data.global_batch_size
    compile_s, first_step_s = run.compile_s, run.first_step_s
    jax.block_until_ready(run.step())  # one untimed warm step
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = run.step()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)

    step_s = float(np.median(times))
    tokens = run.tokens_per_step
    model_flops = metrics_lib.flops_per_token(cfg.model, seq_len) * tokens / step_s
    peak, source = metrics_lib.peak_flops(cfg.metrics.peak_flops)
    figures = {
        "parameters": float(param_count(cfg.model)),
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "step_time_s": step_s,
        "tokens_per_sec": tokens / step_s,
        "model_tflops": model_flops / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": model_flops / peak,
    }
    rows = [
        ("config", f"{cfg.model.family} d={cfg.model.d_model} L={cfg.model.n_layers} "
                   f"seq={seq_len} batch={batch_size} {cfg.model.dtype} remat={cfg.model.remat} "
                   f"attention={cfg.model.attention}"),
        ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}"),
        ("parameters", f"{param_count(cfg.model):,}"),
        ("compile (lower+compile)", f"{compile_s:.2f} s"),
        ("first step (compile+run)", f"{first_step_s:.2f} s"),
        ("step time (median of %d)" % steps, f"{step_s * 1e3:.1f} ms"),
        ("tokens/s", f"{tokens / step_s:,.0f}"),
        ("model FLOP/s", f"{model_flops / 1e12:.3f} TFLOP/s"),
        (f"peak ({source})", f"{peak / 1e12:.3f} TFLOP/s"),
        ("MFU", f"{100 * model_flops / peak:.1f}%"),
        ("final loss", f"{float(out['loss']):.4f}"),
    ]
    print_table(rows)
    return figures


def bench_checkpoint(cfg: ml_collections.ConfigDict, steps: int = 5, rounds: int = 2,
                     directory: str | None = None) -> dict[str, float]:
    """Training throughput with a checkpoint saved every step against none, and the time to
    restore the state against the time to read its files.

    Both loops (`rounds` of `steps` steps each, alternating) run the real step; the saving loop does what `jaxlm train` does at a save
    point (wait for the step, start an asynchronous save) and includes the wait for the
    last save to finish. The files are read (and restored) from the page cache, which is
    how a restore right after a save, or from a fast local disk, sees them.
    """
    import pathlib
    import shutil
    import tempfile

    from jaxlm import checkpoint as checkpoint_lib

    run = _BenchRun(cfg)
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
    metadata = checkpoint_lib.run_metadata(cfg, run.spec.param_axes, "synthetic")

    def save(out: dict) -> None:
        jax.block_until_ready(out["loss"])  # the loop reads the step's metrics at a save
        checkpointer.save(next(step_number), run.state, {"synthetic": True}, metadata)

    try:
        # Alternating rounds, so load that comes and goes on the host hits both loops alike.
        no_save_times, save_times = [], []
        for _ in range(rounds):
            no_save_times.append(timed_steps(None))
            save_times.append(timed_steps(save))
        no_save_s, save_s = sum(no_save_times), sum(save_times)
        step_dir = checkpointer.directory / str(checkpointer.latest_step())
        files = [p for p in step_dir.rglob("*") if p.is_file()]

        nbytes = sum(p.stat().st_size for p in files)

        def restore() -> None:
            restored, _, _ = checkpointer.restore(checkpointer.latest_step(), run.spec.abstract)
            jax.block_until_ready(restored)

        # From disk (the files evicted from the page cache first), then from the cache.
        read_times = {"disk": _timed(_evict_then(files, _read_all)),
                      "cache": _timed(lambda: _read_all(files))}
        restore_times = {"disk": _timed(_evict_then(files, lambda _: restore())),
                         "cache": _timed(restore)}
    finally:
        checkpointer.close()
        shutil.rmtree(root, ignore_errors=True)

    state_bytes = checkpoint_lib.state_nbytes(run.spec.abstract)
    tokens = rounds * steps * run.tokens_per_step
    figures = {"state_bytes": float(state_bytes), "file_bytes": float(nbytes),
               "tokens_per_sec_no_saves": tokens / no_save_s,
               "tokens_per_sec_save_every_step": tokens / save_s,
               "throughput_ratio": no_save_s / save_s,
               **{f"read_{k}_s": v for k, v in read_times.items()},
               **{f"restore_{k}_s": v for k, v in restore_times.items()},
               **{f"restore_over_read_{k}": restore_times[k] / read_times[k] for k in read_times}}
    print_table([
        ("config", f"{cfg.model.family} d={cfg.model.d_model} L={cfg.model.n_layers} "
                   f"seq={cfg.data.seq_len} batch={cfg.data.global_batch_size}"),
        ("timed", f"{rounds} rounds x {steps} steps without saves, then with a save every step"),
        ("state (arrays / files)", f"{state_bytes / 2**20:,.1f} MiB / {nbytes / 2**20:,.1f} MiB "
                                   f"in {len(files)} files"),
        ("tokens/s, no saves", f"{figures['tokens_per_sec_no_saves']:,.0f} "
                               f"(rounds: {', '.join(f'{t:.2f} s' for t in no_save_times)})"),
        ("tokens/s, save every step", f"{figures['tokens_per_sec_save_every_step']:,.0f} "
                                      f"(rounds: {', '.join(f'{t:.2f} s' for t in save_times)})"),
        ("throughput with saves", f"{100 * figures['throughput_ratio']:.1f}% of no saves"),
        *[row for where in ("disk", "cache") for row in (
            (f"read the files ({where})", f"{read_times[where]:.3f} s "
                                          f"({nbytes / read_times[where] / 2**20:,.0f} MiB/s)"),
            (f"restore, fingerprints checked ({where})", f"{restore_times[where]:.3f} s "
                                                         f"= {figures[f'restore_over_read_{where}']:.2f}x the read"))],
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
    import os

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


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def bench_data(cfg: ml_collections.ConfigDict, batches: int = 2000) -> dict[str, float]:
    """The loader alone: batches/s and tokens/s of `make_iterator` on this host, after the
    corpus is built and one batch has warmed it up."""
    from jaxlm.data import pipeline
    from jaxlm.train.loop import prepare_sources

    config_lib.validate(cfg, jax.device_count())
    prepare_sources(cfg.data)
    data_iter = pipeline.make_iterator(cfg.data)
    next(data_iter)
    real = slots = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(data_iter)
        real += int(np.count_nonzero(batch["segment_ids"]))
        slots += batch["segment_ids"].size
    seconds = time.perf_counter() - start
    data_iter.close()
    figures = {"tokens_per_sec": slots / seconds, "real_tokens_per_sec": real / seconds,
               "packing_efficiency": real / slots, "batches_per_sec": batches / seconds}
    print_table([
        ("config", f"dataset={cfg.data.dataset} tokenizer={cfg.data.tokenizer} "
                   f"packing={cfg.data.packing} seq={cfg.data.seq_len} batch={cfg.data.global_batch_size}"),
        (f"batches/s ({batches} batches)", f"{batches / seconds:,.1f}"),
        ("tokens/s (all slots)", f"{slots / seconds:,.0f}"),
        ("real tokens/s", f"{real / seconds:,.0f}"),
        ("packing efficiency", f"{100 * real / slots:.2f}%"),
    ])
    return figures
