"""Building blocks: parameters with logical axes, norms, MLPs, rotary embeddings.

Tensors are named with their shapes: B batch, L sequence, D d_model, F MLP hidden,
H query heads, G key/value heads, K head_dim, V vocabulary.
Parameters are float32; matmuls run in the module's compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.model import quantized
from jaxlm.parallel.rules import constrain


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], std: float) -> nnx.Param:
    """A float32 normal(0, std) parameter annotated with logical axis names."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=tuple(axes))


def constant(shape: Sequence[int], axes: Sequence[str], value: float) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(shape), value, jnp.float32), out_sharding=tuple(axes))


def dense(x_BxLxD: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x @ w over the last axis of x and the first of w (trailing axes of w are kept).

    The matmul runs on 2-D operands, (B*L) x D by D x N: on XLA:CPU the gradient of a 3-D
    einsum is about a third slower than the same work as plain 2-D GEMMs. It is a direct
    `lax.dot_general`, the call quantized training intercepts (jaxlm.quant.training), with
    no jitted wrapper (jnp.dot) whose trace cache could hand a quantized trace to a float
    model or the reverse."""
    b, length, d = x_BxLxD.shape
    out_shape = w.shape[1:]
    common = jnp.promote_types(x_BxLxD.dtype, dtype)  # as jnp.dot(x, w.astype(dtype)) types it
    y = jax.lax.dot_general(x_BxLxD.reshape(b * length, d).astype(common),
                            w.reshape(d, -1).astype(common), (((1,), (0,)), ((), ())))
    return y.reshape(b, length, *out_shape)


def project(module: nnx.Module, name: str, x_BxLxI: jax.Array, dtype,
            w: jax.Array | None = None) -> jax.Array:
    """dense(x, module.<name>) (or `w`, the same weight reshaped for the matmul; a
    quantized weight is rebuilt in the compute dtype, jaxlm.model.quantized); when a
    low-rank adapter is attached as `module.lora_<name>` (jaxlm/finetune/lora.py), the
    adapter computes the projection, without the frozen weight's gradient matmul (on a
    quantized weight, QLoRA, from its codes and scales)."""
    adapter = getattr(module, "lora_" + name, None)
    if adapter is None:
        return dense(x_BxLxI, quantized.weight(module, name, dtype) if w is None else w, dtype)
    if quantized.is_quantized(module, name):
        parts = (getattr(module, name)[...], getattr(module, name + "_scale")[...])
        return adapter.project(x_BxLxI, parts, dtype, getattr(module, name + "_format"))
    return adapter.project(x_BxLxI, getattr(module, name)[...] if w is None else w, dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = constant((dim,), ("norm",), 1.0)
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BxLxD.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = constant((dim,), ("norm",), 1.0)
        self.bias = constant((dim,), ("norm",), 0.0)
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (x * self.scale[...] + self.bias[...]).astype(x_BxLxD.dtype)


class SwiGLU(nnx.Module):
    """LLaMA MLP: down(silu(x W_gate) * (x W_up))."""

    def __init__(self, d_model: int, d_ff: int, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std)
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.output(self.hidden(x_BxLxD))

    def hidden(self, x_BxLxD: jax.Array) -> jax.Array:
        """The hidden units, silu(x W_gate) * (x W_up): B x L x F."""
        gate_BxLxF = project(self, "w_gate", x_BxLxD, self.dtype)
        up_BxLxF = project(self, "w_up", x_BxLxD, self.dtype)
        return constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "act_sequence", "act_mlp"))

    def output(self, h_BxLxF: jax.Array) -> jax.Array:
        return project(self, "w_down", h_BxLxF, self.dtype)


# config model.activation -> the function: exact (erf) GELU as Hugging Face "gelu", the tanh
# approximation ("gelu_new", GPT-2's), ReLU.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class GeluMLP(nnx.Module):
    """GPT-2 / BERT MLP: W_out act(x W_in + b_in) + b_out; act: tanh-approximated GELU as in
    GPT-2 by default, or any of ACTIVATIONS (BERT: exact GELU)."""

    def __init__(self, d_model: int, d_ff: int, std: float, out_std: float, dtype, rngs: nnx.Rngs,
                 activation: str = "gelu_tanh"):
        self.w_in = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.b_in = constant((d_ff,), ("mlp",), 0.0)
        self.w_out = param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std)
        self.b_out = constant((d_model,), ("embed",), 0.0)
        self.dtype = dtype
        self.activation = activation

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.output(self.hidden(x_BxLxD))

    def hidden(self, x_BxLxD: jax.Array) -> jax.Array:
        """The hidden units, act(x W_in + b_in): B x L x F."""
        dt = self.dtype
        h_BxLxF = project(self, "w_in", x_BxLxD, dt) + self.b_in[...].astype(dt)
        return constrain(ACTIVATIONS[self.activation](h_BxLxF),
                         ("batch", "act_sequence", "act_mlp"))

    def output(self, h_BxLxF: jax.Array) -> jax.Array:
        return project(self, "w_out", h_BxLxF, self.dtype) + self.b_out[...].astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary frequencies theta^(-2i/K), optionally rescaled for a longer context exactly as
    Hugging Face transformers does (modeling_rope_utils): "linear" divides every frequency
    by `factor`; "llama3" (Llama 3.1) divides low frequencies (wavelength above
    original_max_len / low_freq_factor) by `factor`, keeps high ones (wavelength below
    original_max_len / high_freq_factor) and blends linearly in between."""

    theta: float
    scaling: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """float32 frequencies, K/2 of them, computed in float32 in the same order of
        operations as transformers, so both give the same angles."""
        f32 = np.float32
        inv = f32(1.0) / (f32(self.theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)))
        if self.scaling == "linear":
            return (inv / f32(self.factor)).astype(f32)
        if self.scaling == "llama3":
            factor, old_len = f32(self.factor), self.original_max_len
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = f32(2 * math.pi) / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = ((f32(old_len) / wavelen - f32(self.low_freq_factor))
                      / f32(self.high_freq_factor - self.low_freq_factor))
            smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(f32)
        return inv.astype(f32)


def rope_spec(model_cfg) -> RopeSpec:
    """The rotary embedding of config keys model.rope_theta and model.rope_scaling."""
    s = model_cfg.rope_scaling
    return RopeSpec(theta=float(model_cfg.rope_theta), scaling=s.type, factor=float(s.factor),
                    low_freq_factor=float(s.low_freq_factor),
                    high_freq_factor=float(s.high_freq_factor),
                    original_max_len=int(s.original_max_len))


def apply_rope(x_BxLxNxK: jax.Array, positions_BxL: jax.Array, rope: float | RopeSpec) -> jax.Array:
    """Rotary embedding, half-split convention (as Hugging Face LLaMA): rotate (x1, x2) pairs
    taken from the two halves of head_dim. `rope` is a RopeSpec or a plain theta."""
    k = x_BxLxNxK.shape[-1]
    rope = rope if isinstance(rope, RopeSpec) else RopeSpec(theta=float(rope))
    inv_freq = jnp.asarray(rope.inv_freq(k))
    angles_BxLxk = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BxLxk)[:, :, None, :]
    sin = jnp.sin(angles_BxLxk)[:, :, None, :]
    x = x_BxLxNxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxK.dtype)
