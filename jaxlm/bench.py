"""`jaxlm bench step`: the training step's speed on synthetic batches, as printed figures.

The step is the real one (same state, sharding, jit and donation as `jaxlm train`); only the
input is synthetic, so the figures measure the model and framework, not the loader.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
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


def bench_step(cfg: ml_collections.ConfigDict, steps: int = 5) -> dict[str, float]:
    config_lib.validate(cfg, jax.device_count())
    cfg = config_lib.resolved(cfg, tokenizers.load_tokenizer(cfg.data).vocab_size, jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    batch_size, seq_len = cfg.data.global_batch_size, cfg.data.seq_len
    with jax.set_mesh(mesh), sharding.axis_rules():
        trainer = step_lib.build_trainer(cfg.model, cfg.optim, cfg.train.steps, mesh, cfg.train.seed)
        spec = trainer.spec
        state = state_lib.init_state(cfg.model, trainer.tx, spec, seed=cfg.train.seed)
        batch = synthetic_batch(batch_size, seq_len, cfg.model.vocab_size, mesh)
        jax.block_until_ready((state, batch))

        start = time.perf_counter()
        compiled = trainer.step.lower(spec.abstract, step_lib.abstract_batch(batch_size, seq_len, mesh)).compile()
        compile_s = time.perf_counter() - start
        state, out = compiled(state, batch)
        jax.block_until_ready(out)
        first_step_s = time.perf_counter() - start

        state, out = compiled(state, batch)  # one untimed warm step
        jax.block_until_ready(out)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, out = compiled(state, batch)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)

    step_s = float(np.median(times))
    tokens = batch_size * seq_len
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
