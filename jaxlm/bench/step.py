"""`jaxlm bench step`: the training step's speed on synthetic batches, as printed figures.

The step is the real one of the task `jaxlm train` runs (same state, shardings, jit and
donation, through the same Task); only the input is synthetic, so the figures measure the
model and framework, not the loader.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from jaxlm.bench.conditions import HostConditions, spread, summary
from jaxlm.bench.table import print_table
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import metrics as metrics_lib
from jaxlm.train.lm import CausalLM
from jaxlm.train.task import Task


def synthetic_batch(task: Task, seed: int = 0, prompt_fraction: float = 0.0) -> dict:
    """A token batch (causal LM, SFT) of random tokens, one document per row, placed as the
    task's step takes it; every target counted, except the first `prompt_fraction` of each
    row (an SFT "prompt")."""
    rng = np.random.default_rng(seed)
    global_batch, seq_len = task.cfg.data.global_batch_size, task.cfg.data.seq_len
    tokens = rng.integers(3, task.cfg.model.vocab_size, size=(global_batch, seq_len + 1),
                          dtype=np.int32)
    host = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((global_batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (global_batch, seq_len)),
        "weights": np.ones((global_batch, seq_len), np.float32),
    }
    host["weights"][:, :int(seq_len * prompt_fraction)] = 0.0
    return {k: jax.device_put(host[k], s) for k, s in task.batch_shardings().items()}


class BenchRun:
    """A task's real compiled step on a synthetic batch; `compile_s` and `first_step_s` are
    measured while it is built."""

    def __init__(self, task: Task, batch: dict | None = None):
        self.task, self.cfg = task, task.cfg
        self.mesh = mesh = mesh_lib.make_mesh(self.cfg.mesh)
        with mesh_lib.use(mesh):
            task.build(mesh)
            self.state = task.init_state()
            self.batch = batch if batch is not None else synthetic_batch(task)
            jax.block_until_ready((self.state, self.batch))
            start = time.perf_counter()
            self.compiled = task.lower().compile()
            self.compile_s = time.perf_counter() - start
            self.out = self.step()
            jax.block_until_ready(self.out)
            self.first_step_s = time.perf_counter() - start
        self.tokens_per_step = self.cfg.data.global_batch_size * self.cfg.data.seq_len

    def step(self) -> dict:
        self.state, self.out = self.compiled(self.state, self.task.frozen, self.batch)
        return self.out


def bench_step(cfg: ml_collections.ConfigDict, steps: int = 5) -> dict[str, float]:
    host = HostConditions()
    run = BenchRun(CausalLM(cfg))
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

    step_s, step_min, step_max = summary(times)
    tokens = run.tokens_per_step
    model_flops = run.task.flops_per_token() * tokens / step_s
    peak, source = metrics_lib.peak_flops(cfg.metrics.peak_flops)
    figures = {
        "parameters": float(zoo.param_count(cfg.model)),
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "step_time_s": step_s, "step_time_s_min": step_min, "step_time_s_max": step_max,
        "tokens_per_sec": tokens / step_s,
        "model_tflops": model_flops / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": model_flops / peak,
        **host.figures(),
    }
    rows = [
        ("config", f"{cfg.model.family} d={cfg.model.d_model} L={cfg.model.n_layers} "
                   f"seq={seq_len} batch={batch_size} {cfg.model.dtype} remat={cfg.model.remat} "
                   f"attention={cfg.model.attention}"),
        ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}"),
        ("parameters", f"{zoo.param_count(cfg.model):,}"),
        ("compile (lower+compile)", f"{compile_s:.2f} s"),
        ("first step (compile+run)", f"{first_step_s:.2f} s"),
        ("step time", spread([t * 1e3 for t in times], ".1f", "ms")),
        ("tokens/s", f"{tokens / step_s:,.0f}"),
        ("model FLOP/s", f"{model_flops / 1e12:.3f} TFLOP/s"),
        (f"peak ({source})", f"{peak / 1e12:.3f} TFLOP/s"),
        ("MFU", f"{100 * model_flops / peak:.1f}%"),
        ("final loss", f"{float(out['loss']):.4f}"),
        *host.rows(),
    ]
    print_table(rows)
    return figures


