"""LoRA: low-rank adapters on the model's projections (Hu et al., 2021).

An adapter of a projection W (in -> out) adds scale * dropout(x) A^T B, with A (r x in, as
PEFT stores it) and B (r x out), scale = alpha / r. B starts at zero, so a fresh adapter
leaves the model's function unchanged. `attach` sets an adapter as attribute `lora_<weight>`
of the attention or MLP module, and `layers.project` lets it compute the projection.

The step never computes the frozen W's gradient matmul (x^T dy, a third of a layer's matmul
work): `lora_matmul` multiplies x by W' = W + scale A^T B (one GEMM, as W alone would cost),
and its backward forms W' again (keeping it from the forward would hold a float copy of
every layer's weights until the backward) and computes dx = dy W'^T and the adapters'
gradients from the thin products h = x A^T and dh = dy B^T; dW = x^T dy is returned for
correctness but nothing uses it when only the adapters train, so XLA removes it. With
dropout the adapter's input differs from W's, so the adapter is applied as a separate
term, (dropout(x) A^T) B.

QLoRA (finetune.base_quant int8 | nf4): the frozen base is held as codes and scales
(jaxlm/model/quantized.py) and `lora_matmul` takes them instead of W: W is rebuilt from
them inside the forward and again inside the backward, one projection at a time, so the
base never exists in float as a whole. The base is quantized when the run loads it (from
the float base run, every time the same way: its fingerprint is the quantized base's).

Adapters live in the stacked layer modules like every weight: A is (layers, r, *in), B is
(layers, r, *out), with the logical axes of W's input and output dimensions ("embed",
"heads", "mlp", ...) and None (replicated) for the small rank axis, so they shard with the
model on any mesh. A is rank-major because its gradient dh^T x then comes out as an r x in
product, which XLA:CPU computes about 5x faster than the in x r product x^T dh. Their
parameters are `LoraParam`s: a fine-tuning run trains and saves only those
(`nnx.state(model, LoraParam)`). Dropout keys (`LoraKey`) are filled in every step.

Targets: q, k, v, o (attention wq, wk, wv, wo) and mlp (every MLP matrix); each model family
names its projections for each target (jaxlm.model.family.Family.lora_targets), in every
layer stack the model has (`blocks`; an encoder-decoder's `encoder_blocks` and
`decoder_blocks`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.config import finetune as finetune_section
from jaxlm.errors import ConfigError
from jaxlm.model import adapters as adapters_lib
from jaxlm.model import quantized
from jaxlm.model.layers import dense
from jaxlm.model.zoo import Family
from jaxlm.parallel import rules


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def lora_matmul(x_TxI: jax.Array, w: Any, a_RxI: jax.Array | None, b_RxO: jax.Array | None,
                scale: float, dtype, fmt: str | None) -> jax.Array:
    """x (W + scale A^T B), in `dtype`, with the backward described in the module docstring.
    `w`: W as I x O, or with `fmt` (QLoRA) the (codes, scales) of a quantized W in their
    stored shapes. Without adapters (a, b None): x W, with the same backward."""
    return jnp.dot(x_TxI, _merged(_weight(w, fmt, x_TxI.shape[1]), a_RxI, b_RxO, scale
                                  ).astype(dtype))


def _weight(w, fmt, n_in):
    """W as I x O: the float weight, or the one a quantized weight's codes stand for."""
    return w if fmt is None else quantized.dequantize(*w, fmt).reshape(n_in, -1)


def _merged(w_IxO, a_RxI, b_RxO, scale):
    return w_IxO if a_RxI is None else w_IxO + scale * jnp.dot(a_RxI.T, b_RxO)


def _lora_matmul_fwd(x_TxI, w, a_RxI, b_RxO, scale, dtype, fmt):
    y = lora_matmul(x_TxI, w, a_RxI, b_RxO, scale, dtype, fmt)
    return y, (x_TxI, w, a_RxI, b_RxO)


def _lora_matmul_bwd(scale, dtype, fmt, residuals, dy_TxO):
    # W' is formed again here rather than kept from the forward: no float copy of every
    # layer's weight waits for the backward (with QLoRA, none of the base ever exists in
    # float beyond the projection being computed).
    x_TxI, w, a_RxI, b_RxO = residuals
    w_IxO = _weight(w, fmt, x_TxI.shape[1])
    dx_TxI = jnp.dot(dy_TxO, _merged(w_IxO, a_RxI, b_RxO, scale).astype(dtype).T)
    # the frozen W's gradient (dead code, removed by XLA); a quantized W has none
    dw = jnp.dot(x_TxI.T, dy_TxO).astype(w.dtype) if fmt is None else (None, None)
    if a_RxI is None:
        return dx_TxI.astype(x_TxI.dtype), dw, None, None
    h_TxR = jnp.dot(x_TxI, a_RxI.astype(dtype).T)
    dh_TxR = jnp.dot(dy_TxO, b_RxO.astype(dtype).T)
    # Rank-major products (r x T) @ (T x n): the fast layout on XLA:CPU.
    db_RxO = (scale * jnp.dot(h_TxR.T, dy_TxO)).astype(b_RxO.dtype)
    da_RxI = (scale * jnp.dot(dh_TxR.T, x_TxI)).astype(a_RxI.dtype)
    return dx_TxI.astype(x_TxI.dtype), dw, da_RxI, db_RxO


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


class LoraParam(nnx.Param):
    """An adapter matrix: what a LoRA run trains and saves."""


class LoraKey(nnx.Variable):
    """Raw uint32 PRNG key data of one adapter's dropout, one per layer; set every step."""


class LoRA(nnx.Module):
    def __init__(self, lora_a: LoraParam, lora_b: LoraParam, scale: float, dropout: float,
                 dtype, key: LoraKey | None):
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale
        self.dropout = dropout  # 0 in evaluation (the eval model is built without dropout)
        self.dtype = dtype
        self.key = key

    def project(self, x_BxLxI: jax.Array, w: Any, dtype, fmt: str | None = None
                ) -> jax.Array:
        """The adapted projection x W + scale (x A^T) B; `w` is W with its input axes
        flattened or not (as layers.dense takes it), or with `fmt` (QLoRA) the (codes,
        scales) of a quantized W, rebuilt inside the matmul (`lora_matmul`)."""
        b, length, i = x_BxLxI.shape
        shape = quantized.unpacked_shape(w[0].shape, fmt) if fmt else w.shape
        out_shape = shape[next(k for k in range(len(shape) + 1) if math.prod(shape[:k]) == i):]
        w = w.reshape(i, -1) if fmt is None else w
        a_RxI, b_RxO = None, None  # with dropout the adapter's term is added apart
        if self.dropout == 0:
            a_RxI = self.lora_a[...].reshape(-1, i)
            b_RxO = self.lora_b[...].reshape(a_RxI.shape[0], -1)
        y = lora_matmul(x_BxLxI.reshape(b * length, i), w, a_RxI, b_RxO, float(self.scale),
                        jnp.dtype(dtype), fmt).reshape(b, length, *out_shape)
        return y if self.dropout == 0 else y + self(x_BxLxI).astype(dtype)

    def __call__(self, x_BxLxI: jax.Array) -> jax.Array:
        """The adapter's term alone, scale (dropout(x) A^T) B."""
        b, length, i = x_BxLxI.shape
        a_RxI = self.lora_a[...].reshape(-1, i).astype(self.dtype)
        if self.dropout > 0:
            keep = jax.random.bernoulli(self.key[...], 1.0 - self.dropout, x_BxLxI.shape)
            x_BxLxI = jnp.where(keep, x_BxLxI / (1.0 - self.dropout), 0).astype(x_BxLxI.dtype)
        h_TxR = jax.lax.dot_general(x_BxLxI.reshape(b * length, i), a_RxI,
                                    (((1,), (1,)), ((), ())))  # x @ A^T
        h_BxLxR = h_TxR.reshape(b, length, -1) * jnp.asarray(self.scale, self.dtype)
        return dense(h_BxLxR, self.lora_b[...], self.dtype)


# The layer stacks of a model: `blocks` (decoders, encoders), or an encoder-decoder's two.
STACKS = ("blocks", "encoder_blocks", "decoder_blocks")


def _targets(model: nnx.Module, family: Family, targets: tuple[str, ...]
             ) -> Iterator[tuple[nnx.Module, str, int]]:
    """(module, weight name, input dimensions) of every adapted projection of the layer
    stacks, in a fixed order: the stacks' (STACKS), then the targets', then the family's."""
    for stack in (getattr(model, s) for s in STACKS if hasattr(model, s)):
        for t in targets:
            for sub, name, n_in in family.lora_targets[t]:
                yield getattr(stack, sub), name, n_in


def check_targets(family: Family, lora_cfg: ml_collections.ConfigDict) -> None:
    """ConfigError naming finetune.lora.targets when the family has no projection of one."""
    missing = [t for t in finetune_section.lora_targets(lora_cfg) if t not in family.lora_targets]
    if missing:
        raise ConfigError(f"config.finetune.lora.targets: family {family.name!r} has no "
                          f"{'/'.join(missing)} projections to adapt; choose from "
                          f"{','.join(family.lora_targets)}")


def attach(model: nnx.Module, family: Family, lora_cfg: ml_collections.ConfigDict, seed: int,
           train: bool = True) -> nnx.Module:
    """Adds adapters to `model` (of `family`) in place and returns it. A is normal with
    std 1/sqrt(fan_in), B zero. `train=False` builds them without dropout (evaluation)."""
    rank, dropout = int(lora_cfg.rank), float(lora_cfg.dropout) if train else 0.0
    key = jax.random.key(seed)
    targets = finetune_section.lora_targets(lora_cfg)
    with nnx.use_eager_sharding(False):  # shardings come from the axes, applied by jit
        for i, (module, name, n_in) in enumerate(_targets(model, family, targets)):
            w = getattr(module, name)
            axes = rules.variable_axes(w)
            layers, in_shape, out_shape = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
            a = jax.random.normal(jax.random.fold_in(key, i), (layers, rank, *in_shape),
                                  jnp.float32) / math.sqrt(math.prod(in_shape))
            b = jnp.zeros((layers, rank, *out_shape), jnp.float32)
            drop_key = LoraKey(jnp.zeros((layers, 2), jnp.uint32), out_sharding=(axes[0], None)) \
                if dropout > 0 else None
            adapter = LoRA(LoraParam(a, out_sharding=(axes[0], None, *axes[1:1 + n_in])),
                           LoraParam(b, out_sharding=(axes[0], None, *axes[1 + n_in:])),
                           scale=finetune_section.lora_scale(lora_cfg), dropout=dropout,
                           dtype=module.dtype, key=drop_key)
            setattr(module, "lora_" + name, adapter)
    return model


def dropout_keys(template: Any, key: jax.Array) -> Any:
    """Fresh uint32 keys shaped like `template` (the LoraKey leaves): leaf i, layer l gets
    split(fold_in(key, i))[l], so every adapter and layer draws its own mask."""
    leaves, treedef = jax.tree.flatten(template)
    return jax.tree.unflatten(treedef, [jax.random.split(jax.random.fold_in(key, i), leaf.shape[0])
                                        for i, leaf in enumerate(leaves)])


def combine(*trees: Any) -> Any:
    """Nested dicts with disjoint leaves merged into one (base + adapters + keys)."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            out[k] = combine(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def merge(base: Any, adapters: Any, lora_cfg: ml_collections.ConfigDict) -> Any:
    """Base parameters with every adapter folded in: W + (alpha / r) A^T B, computed in
    float64 on the host and stored as W's dtype (jaxlm.model.adapters.merge). Returns a new
    nested dict of numpy arrays."""
    return adapters_lib.merge(base, adapters, finetune_section.lora_scale(lora_cfg))
