"""Building blocks: parameters with logical axes, norms, MLPs, rotary embeddings.

Tensors are named with their shapes: B batch, L sequence, D d_model, F MLP hidden,
H query heads, G key/value heads, K head_dim, V vocabulary.
Parameters are float32; matmuls run in the module's compute dtype.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.sharding import constrain


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], std: float) -> nnx.Param:
    """A float32 normal(0, std) parameter annotated with logical axis names."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=tuple(axes))


def constant(shape: Sequence[int], axes: Sequence[str], value: float) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(shape), value, jnp.float32), out_sharding=tuple(axes))


def dense(x_BxLxD: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x @ w over the last axis of x and the first of w (trailing axes of w are kept).

    The matmul runs on 2-D operands, (B*L) x D by D x N: on XLA:CPU the gradient of a 3-D
    einsum is about a third slower than the same work as plain 2-D GEMMs."""
    b, length, d = x_BxLxD.shape
    out_shape = w.shape[1:]
    y = jnp.dot(x_BxLxD.reshape(b * length, d), w.reshape(d, -1).astype(dtype))
    return y.reshape(b, length, *out_shape)


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


def make_norm(family: str, dim: int, eps: float) -> RMSNorm | LayerNorm:
    return RMSNorm(dim, eps) if family == "llama" else LayerNorm(dim, eps)


class SwiGLU(nnx.Module):
    """LLaMA MLP: down(silu(x W_gate) * (x W_up))."""

    def __init__(self, d_model: int, d_ff: int, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std)
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.dtype
        gate_BxLxF = dense(x_BxLxD, self.w_gate[...], dt)
        up_BxLxF = dense(x_BxLxD, self.w_up[...], dt)
        h_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "sequence", "act_mlp"))
        return dense(h_BxLxF, self.w_down[...], dt)


class GeluMLP(nnx.Module):
    """GPT-2 MLP: W_out gelu(x W_in + b_in) + b_out, tanh-approximated GELU as in GPT-2."""

    def __init__(self, d_model: int, d_ff: int, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.w_in = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.b_in = constant((d_ff,), ("mlp",), 0.0)
        self.w_out = param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std)
        self.b_out = constant((d_model,), ("embed",), 0.0)
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.dtype
        h_BxLxF = dense(x_BxLxD, self.w_in[...], dt) + self.b_in[...].astype(dt)
        h_BxLxF = constrain(jax.nn.gelu(h_BxLxF, approximate=True), ("batch", "sequence", "act_mlp"))
        return dense(h_BxLxF, self.w_out[...], dt) + self.b_out[...].astype(dt)


def apply_rope(x_BxLxNxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split convention (as Hugging Face LLaMA): rotate (x1, x2) pairs
    taken from the two halves of head_dim, with frequencies theta^(-2i/K)."""
    k = x_BxLxNxK.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    angles_BxLxk = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BxLxk)[:, :, None, :]
    sin = jnp.sin(angles_BxLxk)[:, :, None, :]
    x = x_BxLxNxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxK.dtype)
