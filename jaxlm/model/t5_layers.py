"""The pieces of the T5 network (jaxlm/model/t5.py): relative position buckets and their
attention bias, masks, attention without query scaling, the MLPs, the encoder and decoder
blocks, and the decoder's generation cache.

T5 as Hugging Face transformers' T5ForConditionalGeneration (and t5x / Mesh TensorFlow)
computes it: RMSNorm without mean subtraction before each sub-layer, attention scores
q.k + bias with no 1/sqrt(K) factor (folded into the initialisation), and a learned bias per
(relative-position bucket, head) added to the self-attention scores of every layer of a
stack (the table lives once per stack). Cross-attention has no position bias.

Tensors are named with their shapes: B batch, L query positions, M key positions, S encoder
length, T decoder (or cache) length, D d_model, H heads, K head_dim, F MLP hidden, N layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxlm.model.attention import _MASKED
from jaxlm.model.layers import ACTIVATIONS, RMSNorm, param, project
from jaxlm.parallel.rules import constrain

ACT_AXES = ("batch", "sequence", "act_embed")
BIAS_AXES = ("batch", "act_heads", "sequence", None)  # B x H x L x M attention biases
# Logical axes of the stacked caches, N x B x H x T x K (existing names: no new rules).
CACHE_AXES = ("layers", "batch", "act_heads", "sequence", None)


# ---- relative positions and masks ----------------------------------------------------------

def relative_buckets(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> jax.Array:
    """The bucket of each relative position (key position - query position), exactly as
    transformers' T5Attention._relative_position_bucket (Mesh TensorFlow's): bidirectional
    (encoder) gives half the buckets to keys after the query; unidirectional (decoder) maps
    every key after the query to bucket 0. Distances below max_exact (half the buckets of
    a direction) have a bucket each; larger ones share logarithmically wider buckets up to
    max_distance, beyond which all fall in the last. float32 as transformers computes it."""
    rel = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(rel.astype(jnp.float32) / max_exact) / jnp.float32(
        math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(rel < max_exact, rel, large)


def relative_bias(table_PxH: jax.Array, q_pos_BxL: jax.Array, k_pos_BxM: jax.Array, *,
                  bidirectional: bool, max_distance: int) -> jax.Array:
    """float32 B x H x L x M bias of a stack's bucket table for these query and key
    positions (B may be 1)."""
    buckets_BxLxM = relative_buckets(k_pos_BxM[:, None, :] - q_pos_BxL[:, :, None],
                                     bidirectional=bidirectional,
                                     num_buckets=table_PxH.shape[0], max_distance=max_distance)
    table = constrain(table_PxH, (None, None))  # a small table: gathered whole
    bias_BxLxMxH = jnp.take(table.astype(jnp.float32), buckets_BxLxM, axis=0)
    return bias_BxLxMxH.transpose(0, 3, 1, 2)


def mask_bias(visible: jax.Array) -> jax.Array:
    """Additive float32 bias: 0 where visible, a large finite negative elsewhere (a row with
    nothing visible stays finite)."""
    return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)


def self_visible(segment_ids_BxL: jax.Array | None, length: int, causal: bool
                 ) -> jax.Array | None:
    """B(or 1) x 1 x L x L: keys of the same segment (causal: and not after the query);
    None when nothing is masked."""
    visible = None
    if causal:
        pos = jnp.arange(length)
        visible = (pos[:, None] >= pos[None, :])[None, None]
    if segment_ids_BxL is not None:
        same = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
        visible = same if visible is None else visible & same
    return visible


def cross_visible(dec_segment_ids_BxT: jax.Array | None, enc_segment_ids_BxS: jax.Array | None,
                  length: int) -> jax.Array | None:
    """B x 1 x T x S: decoder segment k sees encoder segment k (decoder segment ids default to
    1: one example per row); None (every encoder position) without encoder segment ids."""
    if enc_segment_ids_BxS is None:
        return None
    if dec_segment_ids_BxT is None:
        dec_segment_ids_BxT = jnp.ones((enc_segment_ids_BxS.shape[0], length), jnp.int32)
    return (dec_segment_ids_BxT[:, :, None] == enc_segment_ids_BxS[:, None, :])[:, None]


# ---- attention -----------------------------------------------------------------------------

def attend(q_BxLxHxK: jax.Array, blocks: list[tuple[jax.Array, jax.Array, jax.Array]]
           ) -> jax.Array:
    """Softmax attention (no query scaling) over one or more blocks of keys, one softmax over
    all of them: each block is (k B x H x M x K, v B x H x M x K, additive float32 bias
    broadcastable to B x H x L x M). Generation attends over the cache and the new tokens as
    two blocks; the output equals one block of their concatenation."""
    dt = q_BxLxHxK.dtype
    scores = [jnp.einsum("blhk,bhmk->bhlm", q_BxLxHxK, k.astype(dt),
                         preferred_element_type=jnp.float32) + bias for k, _, bias in blocks]
    if len(blocks) == 1:
        probs = [jax.nn.softmax(scores[0], axis=-1)]
    else:
        top = jax.lax.stop_gradient(
            jnp.max(jnp.stack([s.max(-1) for s in scores]), axis=0))[..., None]
        exps = [jnp.exp(s - top) for s in scores]
        denom = sum(e.sum(-1, keepdims=True) for e in exps)
        probs = [e / denom for e in exps]
    out = sum(jnp.einsum("bhlm,bhmk->blhk", p.astype(dt), v.astype(dt),
                         preferred_element_type=jnp.float32) for p, (_, v, _) in zip(probs, blocks))
    return out.astype(dt)


class T5Attention(nnx.Module):
    """q, k, v, o projections without biases; queries from x, keys and values from x (self-)
    or from the encoder output (cross-attention). Weights as jaxlm.model.attention.Attention:
    wq/wk/wv D x H x K, wo H x K x D (LoRA adapters attach the same way)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dtype, rngs: nnx.Rngs):
        # T5's initialisation (Mesh TensorFlow, transformers' initializer_factor 1): the
        # missing 1/sqrt(K) of the scores is folded into wq's scale.
        hk = n_heads * head_dim
        self.wq = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"),
                        (d_model * head_dim) ** -0.5)
        self.wk = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"),
                        d_model ** -0.5)
        self.wv = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"),
                        d_model ** -0.5)
        self.wo = param(rngs, (n_heads, head_dim, d_model), ("heads", "head_dim", "embed"),
                        hk ** -0.5)
        self.dtype = dtype

    def query(self, x_BxLxD: jax.Array) -> jax.Array:
        return constrain(project(self, "wq", x_BxLxD, self.dtype),
                         ("batch", "sequence", "act_heads", None))

    def keys_values(self, x_BxMxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(k, v), each B x H x M x K: the layout attend and the caches read."""
        k = project(self, "wk", x_BxMxD, self.dtype).transpose(0, 2, 1, 3)
        v = project(self, "wv", x_BxMxD, self.dtype).transpose(0, 2, 1, 3)
        axes = ("batch", "act_heads", "sequence", None)
        return constrain(k, axes), constrain(v, axes)

    def output(self, out_BxLxHxK: jax.Array) -> jax.Array:
        b, length = out_BxLxHxK.shape[:2]
        wo_HKxD = self.wo[...].reshape(-1, self.wo.shape[-1])
        return project(self, "wo", out_BxLxHxK.reshape(b, length, -1), self.dtype, wo_HKxD)

    def __call__(self, x_BxLxD: jax.Array, kv_BxMxD: jax.Array, bias) -> jax.Array:
        k, v = self.keys_values(kv_BxMxD)
        return self.output(attend(self.query(x_BxLxD), [(k, v, bias)]))


# ---- MLPs ----------------------------------------------------------------------------------

class DenseMLP(nnx.Module):
    """T5 v1.0: w_out act(x w_in), no biases (transformers' T5DenseActDense)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dtype, rngs: nnx.Rngs):
        self.w_in = param(rngs, (d_model, d_ff), ("embed", "mlp"), d_model ** -0.5)
        self.w_out = param(rngs, (d_ff, d_model), ("mlp", "embed"), d_ff ** -0.5)
        self.activation = activation
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = ACTIVATIONS[self.activation](project(self, "w_in", x_BxLxD, self.dtype))
        h_BxLxF = constrain(h_BxLxF, ("batch", "sequence", "act_mlp"))
        return project(self, "w_out", h_BxLxF, self.dtype)


class GatedMLP(nnx.Module):
    """T5 v1.1 / Flan / mT5: w_down (act(x w_gate) * (x w_up)), no biases (transformers'
    T5DenseGatedActDense: wi_0 is the gate, wi_1 the linear part)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dtype, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), d_model ** -0.5)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), d_model ** -0.5)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), d_ff ** -0.5)
        self.activation = activation
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        gate_BxLxF = ACTIVATIONS[self.activation](project(self, "w_gate", x_BxLxD, self.dtype))
        h_BxLxF = gate_BxLxF * project(self, "w_up", x_BxLxD, self.dtype)
        h_BxLxF = constrain(h_BxLxF, ("batch", "sequence", "act_mlp"))
        return project(self, "w_down", h_BxLxF, self.dtype)


def make_mlp(cfg, dtype, rngs: nnx.Rngs) -> nnx.Module:
    mlp = GatedMLP if cfg.gated_mlp else DenseMLP
    return mlp(cfg.d_model, cfg.d_ff, cfg.activation, dtype, rngs)


# ---- blocks --------------------------------------------------------------------------------

class EncoderBlock(nnx.Module):
    """x + attn(attn_norm(x)) over the block's own sequence, then x + mlp(mlp_norm(x))."""

    def __init__(self, cfg, head_dim: int, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = T5Attention(cfg.d_model, cfg.n_heads, head_dim, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = make_mlp(cfg, dtype, rngs)

    def __call__(self, x_BxSxD: jax.Array, bias_BxHxSxS: jax.Array) -> jax.Array:
        h = self.attn_norm(x_BxSxD)
        x_BxSxD = constrain(x_BxSxD + self.attn(h, h, bias_BxHxSxS), ACT_AXES)
        return constrain(x_BxSxD + self.mlp(self.mlp_norm(x_BxSxD)), ACT_AXES)


class DecoderBlock(nnx.Module):
    """Causal self-attention, cross-attention over the encoder output, MLP; each pre-normed
    and residual."""

    def __init__(self, cfg, head_dim: int, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = T5Attention(cfg.d_model, cfg.n_heads, head_dim, dtype, rngs)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = T5Attention(cfg.d_model, cfg.n_heads, head_dim, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = make_mlp(cfg, dtype, rngs)

    def __call__(self, x_BxTxD, enc_BxSxD, self_bias_BxHxTxT, cross_bias_BxHxTxS):
        h = self.attn_norm(x_BxTxD)
        x_BxTxD = constrain(x_BxTxD + self.attn(h, h, self_bias_BxHxTxT), ACT_AXES)
        h = self.cross_norm(x_BxTxD)
        x_BxTxD = constrain(x_BxTxD + self.cross_attn(h, enc_BxSxD, cross_bias_BxHxTxS), ACT_AXES)
        return constrain(x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), ACT_AXES)

    def step(self, x_BxLxD, k_BxHxTxK, v_BxHxTxK, cross_k_BxHxSxK, cross_v_BxHxSxK, biases):
        """Generation: the new tokens attend to the cache slots and to themselves (`biases`:
        over the cache, among the new tokens, over the encoder); returns (x, (new k, new v),
        each B x H x L x K) for the caller to write into the cache."""
        bias_cache, bias_new, bias_cross = biases
        h = self.attn_norm(x_BxLxD)
        k_new, v_new = self.attn.keys_values(h)
        out = attend(self.attn.query(h), [(k_BxHxTxK, v_BxHxTxK, bias_cache),
                                          (k_new, v_new, bias_new)])
        x_BxLxD = x_BxLxD + self.attn.output(out)
        h = self.cross_norm(x_BxLxD)
        out = attend(self.cross_attn.query(h), [(cross_k_BxHxSxK, cross_v_BxHxSxK, bias_cross)])
        x_BxLxD = x_BxLxD + self.cross_attn.output(out)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), (k_new, v_new)


# ---- the generation cache --------------------------------------------------------------------

@struct.dataclass
class T5Cache:
    """The decoder's state during generation. Every decoder layer's self-attention keys and
    values for `max_len` positions (slots below `index` are written), the cross-attention
    keys and values of the encoder output (computed once), and the encoder's mask. All rows
    decode in step: the token at slot t has position t in every row."""

    k: jax.Array  # N x B x H x T x K, compute dtype
    v: jax.Array  # N x B x H x T x K
    cross_k: jax.Array  # N x B x H x S x K
    cross_v: jax.Array  # N x B x H x S x K
    cross_bias: jax.Array  # B x 1 x 1 x S float32: 0 on encoder tokens, large negative on padding
    index: jax.Array  # int32 scalar: the slot the next token is written to

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def select_rows(cache: T5Cache, rows_B: jax.Array) -> T5Cache:
    """The cache of batch rows `rows_B` (beam search reorders its beams with it): every array
    gathered along its batch axis; the index is shared."""
    take = lambda a, axis: jnp.take(a, rows_B, axis=axis)
    return cache.replace(k=take(cache.k, 1), v=take(cache.v, 1), cross_k=take(cache.cross_k, 1),
                         cross_v=take(cache.cross_v, 1), cross_bias=take(cache.cross_bias, 0))
