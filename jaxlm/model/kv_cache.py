"""The KV cache of generation: every layer's keys and values, preallocated and written in place.

Layout, stacked over layers to match the scanned layer stack (N layers, B rows, G kv heads,
T cache slots, K head_dim):

    k, v: N x B x G x T x K

kv heads come before slots so the decode matmuls read the cache as it lies (a B x T x G x K
cache would be transposed in every layer of every step).

The cache holds keys and values in the model's compute dtype, or in int8
(`generate.kv_cache_dtype`): each key and value vector (one slot of one kv head) as int8
codes with its own float32 scale (absmax / 127 over head_dim), k_scale, v_scale: N x B x G x T.
The scales enter the attention as factors of the scores (keys) and of the softmax weights
(values), so no float copy of the cache is made; a token's own key and value, and the
prompt's during the prefill, are used before rounding.

Prompts are left-padded to a common length P: row b's real tokens occupy slots
start[b] .. P-1 and generated tokens follow at the same slot in every row, so one write
index serves the whole batch. Slot s of row b is a key of a query at slot q iff
start[b] <= s <= q, and the token in slot s has position s - start[b]: a padded prompt
computes what the same prompt computes alone.

A call with `prefill=True` runs the prompt through the model's own attention backend (the
same code as training; flash attention on GPU); later calls attend over the cache slots
written so far and the new tokens themselves. Inside the layer scan the cache is only read;
each layer's new keys and values come out of the scan and are written into the stacked
cache once, in place in the donated buffer (writing inside the scan made XLA copy every
layer's cache on every step: 3x slower decoding at 1,536 tokens of context).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from jaxlm.model import attention, counts
from jaxlm.parallel.rules import constrain

# Logical axes of the stacked cache (the existing activation names: no new rules needed).
CACHE_AXES = ("layers", "batch", "act_kv_heads", "sequence", None)


@struct.dataclass
class KVCache:
    k: jax.Array  # N x B x G x T x K
    v: jax.Array  # N x B x G x T x K
    start_B: jax.Array  # int32: first real slot of each row (left padding before it)
    index: jax.Array  # int32 scalar: the slot the next token is written to
    k_scale: jax.Array | None = None  # N x B x G x T float32 when k is int8 codes
    v_scale: jax.Array | None = None
    prefill: bool = struct.field(pytree_node=False, default=False)

    @property
    def length(self) -> int:
        return self.k.shape[3]


def init_cache(model_cfg: ml_collections.ConfigDict, start_B: jax.Array, length: int,
               dtype: str = "model") -> KVCache:
    """An empty cache of `length` slots for rows whose prompts start at `start_B`, ready for
    a prefill. Keys and values are kept in the model's compute dtype, or as int8 codes
    with scales (`dtype` "int8")."""
    shape = (model_cfg.n_layers, start_B.shape[0], model_cfg.n_kv_heads, length,
             counts.head_dim(model_cfg))
    int8 = dtype == "int8"
    zeros = constrain(jnp.zeros(shape, jnp.int8 if int8 else jnp.dtype(model_cfg.dtype)),
                      CACHE_AXES)
    scales = constrain(jnp.zeros(shape[:-1], jnp.float32), CACHE_AXES[:-1]) if int8 else None
    return KVCache(zeros, zeros, start_B.astype(jnp.int32), jnp.zeros((), jnp.int32),
                   scales, scales, True)


def positions(cache: KVCache, new_tokens: int) -> jax.Array:
    """B x L positions of `new_tokens` tokens written at the cache's index (0 on padding)."""
    slots_L = cache.index + jnp.arange(new_tokens, dtype=jnp.int32)
    return jnp.maximum(slots_L[None, :] - cache.start_B[:, None], 0)


class LayerCache:
    """One layer's view of the cache inside the layer scan; `Attention` calls `attend`.
    The cache is only read here: the new keys and values are returned and written into the
    stacked cache once, after the scan (in place in the donated buffer; writing inside the
    scan would copy every layer's cache on every step)."""

    def __init__(self, k_BxGxTxK, v_BxGxTxK, k_scale_BxGxT, v_scale_BxGxT, prefill: bool):
        self.k_BxGxTxK, self.v_BxGxTxK, self.prefill = k_BxGxTxK, v_BxGxTxK, prefill
        self.k_scale_BxGxT, self.v_scale_BxGxT = k_scale_BxGxT, v_scale_BxGxT
        self.new_k_BxLxGxK = self.new_v_BxLxGxK = None

    def attend(self, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask, backend_attention: Callable):
        """Attention of the new tokens over the cache and themselves; returns (out, self)."""
        self.new_k_BxLxGxK, self.new_v_BxLxGxK = k_BxLxGxK, v_BxLxGxK
        if self.prefill:  # an empty cache: the prompt attends to itself, the backend's way
            return backend_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask), self
        return cached_attention(q_BxLxHxK, self.k_BxGxTxK, self.v_BxGxTxK, k_BxLxGxK,
                                v_BxLxGxK, mask, self.k_scale_BxGxT, self.v_scale_BxGxT), self


def cached_attention(q_BxLxHxK, k_BxGxTxK, v_BxGxTxK, k_BxLxGxK, v_BxLxGxK, biases,
                     k_scale_BxGxT=None, v_scale_BxGxT=None):
    """Softmax attention over the cache slots and the new tokens together (one softmax,
    computed in two parts). `biases`: (B x 1 x LR x T over the cache, 1 x 1 x LR x L among
    the new tokens), finite large negatives where masked. The R = H/G query heads of a kv
    head are folded into the query axis, position-major (as attention.xla_attention).
    With scales, the cache holds int8 codes: slot t's key is k[t] * k_scale[t]."""
    bias_cache, bias_new = biases
    b, length, h, kd = q_BxLxHxK.shape
    g = k_BxGxTxK.shape[1]
    r = h // g
    dt = q_BxLxHxK.dtype
    q_BxGxLRxK = (q_BxLxHxK * jnp.asarray(kd ** -0.5, dt)).reshape(
        b, length, g, r, kd).transpose(0, 2, 1, 3, 4).reshape(b, g, length * r, kd)
    k_new_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3)
    v_new_BxGxLxK = v_BxLxGxK.transpose(0, 2, 1, 3)
    s_cache = jnp.einsum("bgqk,bgtk->bgqt", q_BxGxLRxK, k_BxGxTxK.astype(dt),
                         preferred_element_type=jnp.float32)
    if k_scale_BxGxT is not None:
        s_cache = s_cache * k_scale_BxGxT[:, :, None, :]
    s_cache = s_cache + bias_cache
    s_new = jnp.einsum("bgqk,bglk->bgql", q_BxGxLRxK, k_new_BxGxLxK,
                       preferred_element_type=jnp.float32) + bias_new
    top = jnp.maximum(s_cache.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
    e_cache, e_new = jnp.exp(s_cache - top), jnp.exp(s_new - top)
    denom = e_cache.sum(-1, keepdims=True) + e_new.sum(-1, keepdims=True)
    if v_scale_BxGxT is not None:  # the weights of the slots' values times their scales
        e_cache = e_cache * v_scale_BxGxT[:, :, None, :]
    out = (jnp.einsum("bgqt,bgtk->bgqk", e_cache.astype(dt), v_BxGxTxK.astype(dt),
                      preferred_element_type=jnp.float32)
           + jnp.einsum("bgql,bglk->bgqk", e_new.astype(dt), v_new_BxGxLxK,
                        preferred_element_type=jnp.float32)) / denom
    return out.astype(dt).reshape(b, g, length, r, kd).transpose(0, 2, 1, 3, 4).reshape(
        b, length, h, kd)


def decode_biases(cache: KVCache, new_tokens: int, heads_per_kv: int):
    """(B x 1 x LR x T, 1 x 1 x LR x L) additive float32 biases: cache slot s is visible to
    row b iff start[b] <= s < index (the slots written so far); new token l sees new tokens
    0..l. Rows are position-major: row l*R + j is new token l, head j of its group."""
    slot_T = jnp.arange(cache.length, dtype=jnp.int32)
    visible_BxT = (slot_T[None, :] >= cache.start_B[:, None]) & (slot_T[None, :] < cache.index)
    bias_cache = jnp.where(visible_BxT, 0.0, attention._MASKED).astype(jnp.float32)
    bias_cache = jnp.broadcast_to(bias_cache[:, None, None, :],
                                  (cache.start_B.shape[0], 1, new_tokens * heads_per_kv,
                                   cache.length))
    causal_LxL = jnp.arange(new_tokens)[:, None] >= jnp.arange(new_tokens)[None, :]
    bias_new = jnp.where(causal_LxL, 0.0, attention._MASKED).astype(jnp.float32)
    bias_new = jnp.repeat(bias_new, heads_per_kv, axis=0)[None, None]
    return bias_cache, bias_new


def run_blocks(blocks: nnx.Module, model_cfg: ml_collections.ConfigDict, x_BxLxD: jax.Array,
               positions_BxL: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The layer stack over `cache` (a scan over layers and their cache slices); returns the
    activations and the cache with the new tokens written and its index advanced."""
    new_tokens = x_BxLxD.shape[1]
    heads_per_kv = model_cfg.n_heads // model_cfg.n_kv_heads
    if cache.prefill:
        slot_L = jnp.arange(new_tokens, dtype=jnp.int32)
        segment_ids_BxL = (slot_L[None, :] >= cache.start_B[:, None]).astype(jnp.int32)
        mask = attention.prepare_mask(model_cfg, segment_ids_BxL, new_tokens)
    else:
        mask = decode_biases(cache, new_tokens, heads_per_kv)
    graphdef, stacked = nnx.split(blocks)

    def layer(x, xs):
        layer_state, k, v, k_scale, v_scale = xs
        block = nnx.merge(graphdef, layer_state)
        x, layer_cache = block(x, positions_BxL, mask,
                               cache=LayerCache(k, v, k_scale, v_scale, cache.prefill))
        return x, (layer_cache.new_k_BxLxGxK, layer_cache.new_v_BxLxGxK)

    x_BxLxD, (k_NxBxLxGxK, v_NxBxLxGxK) = jax.lax.scan(
        layer, x_BxLxD, (stacked, cache.k, cache.v, cache.k_scale, cache.v_scale))

    def write(cache_NxBxGxT_, new_NxBxGxL_):
        updated = jax.lax.dynamic_update_slice_in_dim(
            cache_NxBxGxT_, new_NxBxGxL_.astype(cache_NxBxGxT_.dtype), cache.index, axis=3)
        return constrain(updated, CACHE_AXES[:updated.ndim])

    k_NxBxGxLxK, v_NxBxGxLxK = (a.transpose(0, 1, 3, 2, 4) for a in (k_NxBxLxGxK, v_NxBxLxGxK))
    scales = (None, None)
    if cache.k_scale is not None:
        (k_NxBxGxLxK, k_scale), (v_NxBxGxLxK, v_scale) = map(quantize_int8,
                                                             (k_NxBxGxLxK, v_NxBxGxLxK))
        scales = (write(cache.k_scale, k_scale), write(cache.v_scale, v_scale))
    return x_BxLxD, KVCache(write(cache.k, k_NxBxGxLxK), write(cache.v, v_NxBxGxLxK),
                            cache.start_B, cache.index + new_tokens, *scales, prefill=False)


def quantize_int8(x_xK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 codes, float32 scales) of vectors along the last axis: x = codes * scale."""
    scale = jnp.max(jnp.abs(x_xK.astype(jnp.float32)), axis=-1) / 127.0
    safe = jnp.where(scale == 0, 1.0, scale)
    codes = jnp.clip(jnp.round(x_xK.astype(jnp.float32) / safe[..., None]), -127, 127)
    return codes.astype(jnp.int8), scale
