"""Multi-head / grouped-query self-attention with causal and document (segment) masking.

Backends: "xla" (plain einsums, any device), "cudnn" (fused flash attention through
`jax.nn.dot_product_attention`, NVIDIA GPUs, bfloat16/float16), "splash" (Pallas splash
attention, TPU; interpreted elsewhere: jaxlm/model/splash.py) and "auto", the default:
splash when the mesh's devices are TPUs, xla elsewhere. Splash runs sequences of whole
128-lane tiles; any other length (a generation prefill of a prompt's length) takes the xla
path, decided when the mask is prepared. Decoders attend causally
(the default); an encoder (`causal=False`: BERT) attends to every position of its document.

Under context parallelism (jaxlm/model/context.py) a causal row arrives in the balanced
order: `order` gives each position's original index, and causality follows it. The xla
backend then attends over every key (XLA gathers the sequence-split keys and values);
splash gathers them inside its shard_map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.model import context, quantized, splash
from jaxlm.model.layers import RopeSpec, apply_rope, constant, param, project
from jaxlm.parallel.rules import constrain, platform

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: rows never become NaN
QUERY_CHUNKS = 4  # causal blocks: chunk i attends keys of chunks 0..i only (10/16 of the work)


def attention_mask(segment_ids_BxL: jax.Array | None, length: int, causal: bool = True,
                   order=None) -> jax.Array | None:
    """Boolean B(or 1)x1xLxL mask: causal (when `causal`; by `order`, the positions'
    original indices, when given), and within one document when segment ids are given;
    None when neither restricts anything."""
    pos = jnp.arange(length) if order is None else jnp.asarray(order)
    if segment_ids_BxL is None:
        if not causal:
            return None
        return (pos[:, None] >= pos[None, :])[None, None]
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    if causal:
        same_doc_BxLxL = (pos[:, None] >= pos[None, :])[None] & same_doc_BxLxL
    return same_doc_BxLxL[:, None]


def xla_prepare(segment_ids_BxL: jax.Array | None, length: int, heads_per_kv: int,
                causal: bool = True, order=None) -> jax.Array | None:
    """Additive float32 mask bias, B x 1 x (L*R) x L, built once per step for every layer
    (None: nothing masked, bidirectional attention over one document).

    Row l*R + j belongs to position l, query head j of its kv group (see xla_attention)."""
    mask = attention_mask(segment_ids_BxL, length, causal, order)
    if mask is None:
        return None
    bias = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)
    return jnp.repeat(bias, heads_per_kv, axis=2) if heads_per_kv > 1 else bias


def xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, bias_Bx1xLRxL, causal: bool = True):
    # Plain 4-D batched matmuls over leading (B, G): the R = H/G query heads that share a kv
    # head are folded into the query axis (position-major), so a causal block of positions
    # is one contiguous slice. Causal: query chunk i only computes scores against keys
    # 0..end_i. On XLA:CPU this runs attention's forward+backward ~2x faster than a 5-D
    # einsum. Bidirectional (`causal=False`): one chunk over every key.
    b, length, h, kd = q_BxLxHxK.shape
    g = k_BxLxGxK.shape[2]
    r = h // g
    q_BxGxLRxK = (q_BxLxHxK * jnp.asarray(kd ** -0.5, q_BxLxHxK.dtype)).reshape(
        b, length, g, r, kd).transpose(0, 2, 1, 3, 4).reshape(b, g, length * r, kd)
    k_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3)
    v_BxGxLxK = v_BxLxGxK.transpose(0, 2, 1, 3)
    # (Under context parallelism rows are in the balanced order: no causal prefix to skip.)
    chunks = (QUERY_CHUNKS if causal and length % QUERY_CHUNKS == 0 and context.shards() == 1
              else 1)
    size = length // chunks
    outs = []
    for i in range(chunks):
        end = (i + 1) * size
        rows = slice(i * size * r, end * r)
        scores = jnp.einsum("bgqk,bgmk->bgqm", q_BxGxLRxK[:, :, rows], k_BxGxLxK[:, :, :end],
                            preferred_element_type=jnp.float32)
        if bias_Bx1xLRxL is not None:
            scores = scores + bias_Bx1xLRxL[:, :, rows, :end]
        probs = jax.nn.softmax(scores, axis=-1)
        outs.append(jnp.einsum("bgqm,bgmk->bgqk", probs.astype(v_BxGxLxK.dtype),
                               v_BxGxLxK[:, :, :end]))
    out_BxGxLRxK = jnp.concatenate(outs, axis=2) if chunks > 1 else outs[0]
    return out_BxGxLRxK.reshape(b, g, length, r, kd).transpose(0, 2, 1, 3, 4).reshape(
        b, length, h, kd)


def cudnn_prepare(segment_ids_BxL: jax.Array | None, length: int, heads_per_kv: int,
                  causal: bool = True):
    # Without segment ids cuDNN builds the causal mask itself (is_causal) or needs none; with
    # them the document mask is passed explicitly (cuDNN turns it into a bias).
    return None if segment_ids_BxL is None else attention_mask(segment_ids_BxL, length, causal)


def cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_Bx1xLxL, causal: bool = True):
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_Bx1xLxL,
                                        is_causal=causal, implementation="cudnn")


def resolve(backend: str, platform: str, length: int, shards: int = 1) -> str:
    """The backend that runs: "auto" is splash on TPU and xla elsewhere; splash runs whole
    128-lane tiles only (each of the 2 x `shards` chunks of context parallelism), other
    lengths (a prompt's prefill) run on xla."""
    if backend == "auto":
        backend = "splash" if platform == "tpu" else "xla"
    if backend == "splash" and not splash.supports(length, shards):
        return "xla"
    return backend


def splash_or_xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask, causal: bool = True):
    """Splash when the prepared mask is a splash one, else xla (see `resolve`)."""
    if isinstance(mask, splash.SplashMask):
        return splash.splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask, causal)
    return xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask, causal)


# backend -> (prepare the mask input once per step, attend); "splash" and "auto" prepare
# through `resolve` in prepare_mask.
BACKENDS = {"xla": (xla_prepare, xla_attention), "cudnn": (cudnn_prepare, cudnn_attention),
            "splash": (None, splash_or_xla_attention),
            "auto": (None, splash_or_xla_attention)}


def prepare_mask(model_cfg: ml_collections.ConfigDict, segment_ids_BxL: jax.Array | None,
                 length: int, causal: bool = True, order=None):
    """The mask input every layer's attention takes (model_cfg.attention's backend, as
    `resolve` settles it on this mesh's platform), computed once outside the layer scan
    (`causal` as the layers' Attention; `order`: the balanced layout of context
    parallelism, context.balanced_order, for causal rows split over the context axis)."""
    shards = context.shards()
    backend = resolve(model_cfg.attention, platform(), length, shards)
    if backend == "splash" and causal and shards > 1 and order is None:
        backend = "xla"  # a causal row in its own order on a split sequence (a prefill)
    if backend == "splash":
        return splash.splash_prepare(segment_ids_BxL, length, model_cfg.splash_block, shards)
    heads_per_kv = model_cfg.n_heads // model_cfg.n_kv_heads
    if backend == "xla":
        return xla_prepare(segment_ids_BxL, length, heads_per_kv, causal, order)
    return BACKENDS[backend][0](segment_ids_BxL, length, heads_per_kv, causal)


class Attention(nnx.Module):
    def __init__(self, *, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 use_bias: bool, rope_theta: float | RopeSpec | None, std: float,
                 out_std: float, dtype, backend: str, rngs: nnx.Rngs, qkv_bias: bool = False,
                 causal: bool = True):
        """use_bias: biases on q, k, v and the output (GPT-2); qkv_bias: on q, k, v only
        (Qwen2). rope_theta: a RopeSpec (or plain theta) for rotary embeddings, None: none.
        causal: False for an encoder (every position of the document; no KV cache)."""
        self.wq = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (n_heads, head_dim, d_model), ("heads", "head_dim", "embed"), out_std)
        if use_bias or qkv_bias:
            self.bq = constant((n_heads, head_dim), ("heads", "head_dim"), 0.0)
            self.bk = constant((n_kv_heads, head_dim), ("kv_heads", "head_dim"), 0.0)
            self.bv = constant((n_kv_heads, head_dim), ("kv_heads", "head_dim"), 0.0)
        if use_bias:
            self.bo = constant((d_model,), ("embed",), 0.0)
        self.use_bias = use_bias  # the output bias
        self.qkv_bias = use_bias or qkv_bias
        self.rope_theta = rope_theta
        self.dtype = dtype
        self.backend = backend
        self.causal = causal

    def __call__(self, x_BxLxD, positions_BxL, mask, cache=None):
        """`mask` comes from `prepare_mask` for this module's backend. With `cache` (a
        kv_cache.LayerCache, generation) returns (out, cache updated)."""
        if cache is None:
            return self.output(self.heads(x_BxLxD, positions_BxL, mask))
        out_BxLxHxK, cache = self.heads(x_BxLxD, positions_BxL, mask, cache)
        return self.output(out_BxLxHxK), cache

    def heads(self, x_BxLxD, positions_BxL, mask, cache=None):
        """Every head's attention output, B x L x H x K, before the output projection (with
        `cache`: and the cache updated)."""
        dt = self.dtype
        q = project(self, "wq", x_BxLxD, dt)
        k = project(self, "wk", x_BxLxD, dt)
        v = project(self, "wv", x_BxLxD, dt)
        if self.qkv_bias:
            q, k, v = (q + self.bq[...].astype(dt), k + self.bk[...].astype(dt),
                       v + self.bv[...].astype(dt))
        if self.rope_theta is not None:
            q = apply_rope(q, positions_BxL, self.rope_theta)
            k = apply_rope(k, positions_BxL, self.rope_theta)
        q = constrain(q, ("batch", "act_sequence", "act_heads", None))
        k = constrain(k, ("batch", "act_sequence", "act_kv_heads", None))
        v = constrain(v, ("batch", "act_sequence", "act_kv_heads", None))
        if cache is None:
            return BACKENDS[self.backend][1](q, k, v, mask, causal=self.causal)
        # generation: attend over the KV cache too (jaxlm/model/kv_cache.py)
        return cache.attend(q, k, v, mask, BACKENDS[self.backend][1])

    def output(self, out_BxLxHxK):
        """The heads' outputs projected back to the model: B x L x D."""
        dt = self.dtype
        b, length = out_BxLxHxK.shape[:2]
        wo_HxKxD = quantized.weight(self, "wo", dt)
        wo_HKxD = wo_HxKxD.reshape(-1, wo_HxKxD.shape[-1])
        out = project(self, "wo", out_BxLxHxK.reshape(b, length, -1), dt, wo_HKxD)
        return out + self.bo[...].astype(dt) if self.use_bias else out
