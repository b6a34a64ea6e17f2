"""`jaxlm bench step`: the training step's speed on synthetic batches, as printed figures.

The step is the real one of the pretraining task `jaxlm train` runs for the config's
objective (jaxlm.train.pretraining.task: causal LM, masked LM, span corruption; same state,
shardings, jit and donation, through the same Task); only the input is synthetic, so the
figures measure the model and framework, not the loader. Tokens are the task's tokens per
step, B x data.seq_len (an encoder-decoder's encoder inputs; its decoder targets are printed
beside them), and model FLOP/s is the task's analytic flops_per_token times those tokens
over the step time.

MFU is printed twice: against the host's peak (jaxlm.train.metrics.peak_flops: on CPU the
best of five float32 2048^3 matmuls, measured after the steps, as training reports it), and,
on CPU, per round against one such matmul timed between the steps (jaxlm.bench.conditions.
interleaved), so that a host whose load comes and goes weighs the step and its peak alike.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm.bench.conditions import (
    HostConditions,
    interleaved,
    median_min_max,
    spread,
    summary,
)
from jaxlm.bench.table import print_table
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import pretraining
from jaxlm.train.task import Task


def synthetic_batch(task: Task, seed: int = 0, prompt_fraction: float = 0.0) -> dict:
    """A batch of random tokens for the task's layout, one document (example) per row,
    placed as the task's step takes it. Token-level tasks (causal or masked LM, SFT): targets
    are the inputs shifted by one, every target counted except the first `prompt_fraction`
    of each row (an SFT "prompt"). Encoder-decoder (span corruption): random encoder
    inputs, random targets, decoder inputs the targets shifted right after id 0. Other keys
    (offline distillation's cached teacher logits and ids): random values."""
    rng = np.random.default_rng(seed)
    layout = task.batch_layout()
    vocab = task.cfg.model.vocab_size
    host: dict[str, np.ndarray] = {}
    for key, (shape, dtype, _) in layout.items():
        if key.endswith("segment_ids"):
            host[key] = np.ones(shape, np.int32)
        elif key.endswith("positions"):
            host[key] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
    rows, length = layout["targets"][0]
    host["weights"] = np.ones((rows, length), np.float32)
    host["weights"][:, :int(length * prompt_fraction)] = 0.0
    if "decoder_inputs" in layout:
        host["inputs"] = rng.integers(3, vocab, size=layout["inputs"][0], dtype=np.int32)
        host["targets"] = rng.integers(3, vocab, size=(rows, length), dtype=np.int32)
        host["decoder_inputs"] = np.pad(host["targets"][:, :-1], ((0, 0), (1, 0)))
    else:
        tokens = rng.integers(3, vocab, size=(rows, length + 1), dtype=np.int32)
        host["inputs"], host["targets"] = tokens[:, :-1], tokens[:, 1:]
    for key, (shape, dtype, _) in layout.items():  # a cached teacher's top-k logits and ids
        if key not in host:
            host[key] = (rng.integers(0, vocab, size=shape, dtype=np.int32)
                         if np.issubdtype(dtype, np.integer) else
                         rng.standard_normal(shape).astype(np.float32))
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


MATMUL_N = 2048  # the interleaved peak's product: n x n by n x n, float32, as metrics measures


def matmul_timer(n: int = MATMUL_N):
    """A function running one float32 n x n x n matmul on the first CPU device (compiled and
    run once here), for timing between steps."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices(backend="cpu")[0])
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    return lambda: matmul(a, a).block_until_ready()


def describe_model(cfg: ml_collections.ConfigDict, targets_len: int | None) -> str:
    """The config row: family, shape, objective (an encoder-decoder: layers per stack and
    the decoder's target length)."""
    m = cfg.model
    if targets_len is None:
        layers, seq = f"L={m.n_layers}", f"seq={cfg.data.seq_len}"
    else:
        layers = f"L={m.n_layers}+{m.n_decoder_layers or m.n_layers} (encoder+decoder)"
        seq = f"seq={cfg.data.seq_len} targets={targets_len}"
    return (f"{m.family} d={m.d_model} {layers} heads={m.n_heads} ff={m.d_ff} "
            f"vocab={m.vocab_size} {seq} batch={cfg.data.global_batch_size} {m.dtype} "
            f"remat={m.remat} attention={m.attention} objective={cfg.objective.name}")


def bench_step(cfg: ml_collections.ConfigDict, steps: int = 5) -> dict[str, float]:
    host = HostConditions()
    run = BenchRun(pretraining.task(cfg))
    cfg, mesh = run.cfg, run.mesh
    batch_size = cfg.data.global_batch_size
    compile_s, first_step_s = run.compile_s, run.first_step_s
    jax.block_until_ready(run.step())  # one untimed warm step
    on_cpu = jax.devices()[0].platform == "cpu" and not cfg.metrics.peak_flops > 0
    sides = {"step": lambda: jax.block_until_ready(run.step())}
    if on_cpu:
        sides["matmul"] = matmul_timer()
    rounds = interleaved(sides, steps)
    times, out = rounds["step"], run.out

    step_s, step_min, step_max = summary(times)
    tokens = run.tokens_per_step
    layout = run.task.batch_layout()
    targets_len = layout["targets"][0][1] if "decoder_inputs" in layout else None
    flops_per_token = run.task.flops_per_token()
    model_flops = flops_per_token * tokens / step_s
    peak, source = metrics_lib.peak_flops(cfg.metrics.peak_flops)
    if on_cpu:  # model FLOP/s over the matmul's FLOP/s, round by round
        step_flops = flops_per_token * tokens
        round_mfu = [(step_flops / t) / (2.0 * MATMUL_N**3 / m)
                     for t, m in zip(times, rounds["matmul"])]
    figures = {
        "parameters": float(zoo.param_count(cfg.model)),
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "step_time_s": step_s, "step_time_s_min": step_min, "step_time_s_max": step_max,
        "tokens_per_sec": tokens / step_s,
        "flops_per_token": flops_per_token,
        "model_tflops": model_flops / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": model_flops / peak,
        **(median_min_max("mfu_interleaved", round_mfu) if on_cpu else {}),
        **host.figures(),
    }
    rows = [
        ("config", describe_model(cfg, targets_len)),
        ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
                    f"mesh {dict(mesh.shape)}"),
        ("parameters", f"{zoo.param_count(cfg.model):,}"),
        ("compile (lower+compile)", f"{compile_s:.2f} s"),
        ("first step (compile+run)", f"{first_step_s:.2f} s"),
        ("step time", spread([t * 1e3 for t in times], ".1f", "ms")),
        ("tokens/s", f"{tokens / step_s:,.0f}"
                     + ("" if targets_len is None else " (encoder inputs)")),
        *([] if targets_len is None else [
            ("target tokens/s", f"{batch_size * targets_len / step_s:,.0f} (decoder)")]),
        ("model FLOPs per token", f"{flops_per_token:,.0f} FLOP"),
        ("model FLOP/s", f"{model_flops / 1e12:.3f} TFLOP/s"),
        (f"peak ({source})", f"{peak / 1e12:.3f} TFLOP/s"),
        ("MFU", f"{100 * model_flops / peak:.1f}%"),
        *([] if not on_cpu else [
            ("matmul between steps", spread([2.0 * MATMUL_N**3 / m / 1e12 for m in
                                             rounds["matmul"]], ".3f", "TFLOP/s")),
            ("MFU per round vs that matmul", spread([100 * x for x in round_mfu], ".1f", "%"))]),
        ("final loss", f"{float(out['loss']):.4f}"),
        *host.rows(),
    ]
    print_table(rows)
    return figures


