"""FLOPs and MFU accounting, metrics writers (JSONL, TensorBoard) and the progress line.

Model FLOPs per trained token (forward + backward = 3 x forward, a matmul of m x n by n x k
costing 2mnk):

    6 * N_matmul + 6 * n_layers * seq_len * n_heads * head_dim

N_matmul counts parameters that take part in matmuls: attention and MLP weights of every
layer plus the output head (D x V, counted also when tied to the embedding); it excludes the
embedding lookup, position table, norms and biases. The attention term is the QK^T and PV
matmuls, 12 * n_layers * seq_len * n_heads * head_dim per token for full attention, halved
because a causal mask makes half of it unnecessary. Recomputation from remat is not
counted: MFU measures useful work.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import config as config_lib

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(model_cfg: ml_collections.ConfigDict) -> int:
    d, f, v, n = model_cfg.d_model, model_cfg.d_ff, model_cfg.vocab_size, model_cfg.n_layers
    h, g, k = model_cfg.n_heads, model_cfg.n_kv_heads, config_lib.head_dim(model_cfg)
    mlp_mats = 3 if model_cfg.family == "llama" else 2
    return n * (2 * d * h * k + 2 * d * g * k + mlp_mats * d * f) + d * v


def flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring)."""
    attention = 6 * model_cfg.n_layers * seq_len * model_cfg.n_heads * config_lib.head_dim(model_cfg)
    return 6.0 * matmul_params(model_cfg) + attention


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
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return flops * len(devices), f"{kind} data sheet"
    raise ValueError(f"no peak FLOP/s known for device kind {kind!r}: set config.metrics.peak_flops")


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and the same scalars to
    TensorBoard. Only the writing process (process 0) creates files."""

    def __init__(self, workdir: str | pathlib.Path, tensorboard: bool, active: bool):
        self.active = active
        self._jsonl = None
        self._tb = None
        if not active:
            return
        workdir = pathlib.Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(step: int, total: int, scalars: Mapping[str, float], eta_s: float) -> str:
    return (f"step {step}/{total}  loss {scalars['loss']:.4f}  "
            f"tok/s {scalars['tokens_per_sec']:,.0f}  MFU {100 * scalars['mfu']:.1f}%  "
            f"lr {scalars['learning_rate']:.2e}  ETA {format_duration(eta_s)}")


def print_progress(line: str, active: bool) -> None:
    """A live line on a terminal; one line per log otherwise (files, CI)."""
    if not active:
        return
    if sys.stdout.isatty():
        print("\r\033[K" + line, end="", flush=True)
    else:
        print(line, flush=True)
