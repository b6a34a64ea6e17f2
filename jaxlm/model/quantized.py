"""Weight-only quantized parameters: a weight stored as small integers and scales.

A quantized run (`jaxlm quantize`; config `model.weights`) stores each projection of the
blocks, the embedding and the LM head as integer codes of the weight's own shape plus
float scales, and its model reads them through `weight`, which rebuilds the float weight
inside the jitted computation, one layer at a time under the layer scan (never a float
copy of the whole model). Norms, biases and position tables stay float.

    int8   w = code * scale, code in [-127, 127]
    int4   w = code * scale, code in [-7, 7]
    nf4    w = NF4[code + 8] * scale: the 16 quantiles of a normal distribution scaled to
           [-1, 1] (QLoRA's NormalFloat), code in [-8, 7]

4-bit codes are stored two to a byte along the weight's last axis (uint8: code 2j + 8 in
the low nibble, code 2j + 1 + 8 in the high one), so a 4-bit weight's stored array has half
its last axis (which must be even; config validation says so). Plain uint8 rather than
JAX's int4: Orbax, every backend's layouts and the ahead-of-time compiled step take it as
any array (XLA:CPU cannot feed a sharded int4 array to an ahead-of-time compiled
function), and unpacking is element-wise work that fuses into the matmul's operand read.

Scales are absmax / qmax over a group of `group` consecutive elements along the weight's
input axis (the axis the matmul contracts; for the output projection wo, H x K x D, its
head_dim axis; for the embedding, its model dimension, which the tied head contracts), or
over the whole input axis (`group` 0: one scale per output channel). A scale array has the
weight's shape with that axis divided by the group: where the two shapes differ is where
the groups lie, so `dequantize` needs nothing else. Scales are float32 per channel and
bfloat16 per group (the group scales are 1/16 of an int4 weight's bytes in bfloat16), and
codes are rounded against the stored scale, so the stored scale is the one that was used.

A quantized weight is an `nnx.Param` of (packed) codes with the float weight's logical axes, its
scales `<name>_scale` (the same axes, the grouped axis unsharded), and a static attribute
`<name>_format` ("int8", "int4", "nf4") that `weight` reads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.parallel.rules import constrain

# model.weights -> the largest code; int8's codes are int8, 4-bit codes are packed in uint8
QMAX = {"int8": 127, "int4": 7, "nf4": 7}
PACKED = ("int4", "nf4")
# NormalFloat4 (Dettmers et al., QLoRA, appendix E): code c stands for NF4[c + 8].
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
# The weights a quantized run stores quantized, by attribute name, and the axis each one's
# groups run along (counted from the end: the same with and without the stacked layers axis).
GROUP_AXIS = {"wq": -3, "wk": -3, "wv": -3, "wo": -2, "w_gate": -2, "w_up": -2,
              "w_down": -2, "w_in": -2, "w_out": -2, "embed": -1, "lm_head": -2}


def quantize(w: jax.Array, fmt: str, group: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of float weight `w` in format `fmt`, groups of `group` along `axis`
    (0: the whole axis). The group must divide the axis (config validation says so)."""
    qmax = QMAX[fmt]
    axis = axis % w.ndim
    size = w.shape[axis]
    group = group or size
    scale_type = jnp.float32 if group == size else jnp.bfloat16
    w32 = w.astype(jnp.float32)
    grouped = w32.reshape(w.shape[:axis] + (size // group, group) + w.shape[axis + 1:])
    absmax = jnp.max(jnp.abs(grouped), axis=axis + 1)
    scale = (absmax / (1.0 if fmt == "nf4" else qmax)).astype(scale_type)
    safe = jnp.where(scale == 0, 1, scale).astype(jnp.float32)
    x = grouped / jnp.expand_dims(safe, axis + 1)
    if fmt == "nf4":  # the nearest of the 16 levels
        codes = jnp.argmin(jnp.abs(x[..., None] - jnp.asarray(NF4)), axis=-1) - 8
    else:
        codes = jnp.clip(jnp.round(x), -qmax, qmax)
    codes = codes.reshape(w.shape)
    if fmt not in PACKED:
        return codes.astype(jnp.int8), scale
    pairs = (codes.astype(jnp.int32) + 8).reshape(w.shape[:-1] + (w.shape[-1] // 2, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8), scale


def unpacked_shape(codes_shape: tuple, fmt: str) -> tuple:
    """The weight's shape: 4-bit codes hold two to a byte along the last axis."""
    if fmt not in PACKED:
        return tuple(codes_shape)
    return tuple(codes_shape[:-1]) + (2 * codes_shape[-1],)


def unpack(codes: jax.Array, fmt: str) -> jax.Array:
    """int32 codes in the weight's shape (4-bit: unpacked, back in [-8, 7])."""
    if fmt not in PACKED:
        return codes.astype(jnp.int32)
    low, high = codes & 0xF, codes >> 4
    both = jnp.stack([low, high], axis=-1).astype(jnp.int32) - 8
    return both.reshape(unpacked_shape(codes.shape, fmt))


def dequantize(codes: jax.Array, scale: jax.Array, fmt: str, dtype=jnp.float32) -> jax.Array:
    """The float weight (in `dtype`) that `codes` and `scale` stand for."""
    codes = unpack(codes, fmt)
    axis = next((i for i, (a, b) in enumerate(zip(codes.shape, scale.shape)) if a != b), None)
    values = jnp.asarray(NF4)[codes + 8] if fmt == "nf4" else codes
    values = values.astype(dtype)
    if axis is None:  # as many scales as codes: groups of one
        return values * scale.astype(dtype)
    n = scale.shape[axis]
    grouped = values.reshape(codes.shape[:axis] + (n, codes.shape[axis] // n)
                             + codes.shape[axis + 1:])
    return (grouped * jnp.expand_dims(scale.astype(dtype), axis + 1)).reshape(codes.shape)


def is_quantized(module: nnx.Module, name: str) -> bool:
    return getattr(module, name + "_format", None) is not None


def weight(module: nnx.Module, name: str, dtype=jnp.float32) -> jax.Array:
    """The float value of `module.<name>`: read as stored, or rebuilt from its codes."""
    if not is_quantized(module, name):
        return getattr(module, name)[...]
    return dequantize(getattr(module, name)[...], getattr(module, name + "_scale")[...],
                      getattr(module, name + "_format"), dtype)


def take_rows(module: nnx.Module, name: str, ids: jax.Array, axes: tuple) -> jax.Array:
    """Rows `ids` of the table `module.<name>` (float32), the table constrained to `axes`
    first; a quantized table is read row by row (its groups run along the rows)."""
    if not is_quantized(module, name):
        return jnp.take(constrain(getattr(module, name)[...], axes), ids, axis=0)
    codes = jnp.take(constrain(getattr(module, name)[...], axes), ids, axis=0)
    scale = jnp.take(constrain(getattr(module, name + "_scale")[...], axes), ids, axis=0)
    return dequantize(codes, scale, getattr(module, name + "_format"))


def quantize_model(model: nnx.Module, fmt: str, group: int) -> nnx.Module:
    """`model` with every weight named in GROUP_AXIS replaced in place by its codes, scales
    and format (under nnx.eval_shape: the abstract quantized model). Returns the model."""
    with nnx.use_eager_sharding(False):  # shardings are applied by jit, from the rules
        for _, module in nnx.iter_modules(model):
            _quantize_module(module, fmt, group)
    return model


def _quantize_module(module: nnx.Module, fmt: str, group: int) -> None:
    for name, axis in GROUP_AXIS.items():
        param = getattr(module, name, None)
        if not isinstance(param, nnx.Param) or is_quantized(module, name):
            continue
        value = param[...]
        codes, scale = quantize(value, fmt, group, axis)
        axes = param.get_metadata()["out_sharding"]
        scale_axes = tuple(None if i == axis % value.ndim else a for i, a in enumerate(axes))
        setattr(module, name, nnx.Param(codes, out_sharding=axes))
        setattr(module, name + "_scale", nnx.Param(scale, out_sharding=scale_axes))
        setattr(module, name + "_format", fmt)



def quantize_params(graphdef: Any, params: Any, fmt: str, group: int) -> dict:
    """The parameters (nested dict) of the float model `graphdef` with `params`, quantized:
    what a quantized model of the same config holds (jit it to quantize where the arrays
    are, shard by shard)."""
    model = quantize_model(nnx.merge(graphdef, params), fmt, group)
    return nnx.to_pure_dict(nnx.state(model))


def dequantize_tree(params: Any, fmt: str) -> dict:
    """A quantized model's parameters (nested dict) with every weight's codes and scales
    replaced by the float32 weight they stand for (host arrays): the float model's
    parameters."""
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            out[name] = dequantize_tree(value, fmt)
        elif name.endswith("_scale") and name[:-len("_scale")] in params:
            continue
        elif name + "_scale" in params:
            out[name] = np.asarray(dequantize(jnp.asarray(value), jnp.asarray(
                params[name + "_scale"]), fmt))
        else:
            out[name] = np.asarray(value)
    return out
