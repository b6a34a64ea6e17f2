"""The T5 network: an encoder-decoder as transformers' T5ForConditionalGeneration computes it,
in the T5 v1.0 shape (ReLU MLP, head tied to the embedding with the d_model**-0.5 rescaling)
and the v1.1 / Flan-T5 / mT5 shape (gated tanh-GELU MLP, untied head). Its layers:
jaxlm/model/t5_layers.py; its checks and counts: the t5 record of jaxlm.model.zoo.

Parameter tree (what checkpoints and the Hugging Face mapping name):
    embed                  V x D, the input table of both stacks (and the tied head)
    encoder_blocks/        {attn_norm, attn {wq, wk, wv, wo}, mlp_norm, mlp}, layer axis first
    encoder_rel_bias       buckets x H, the encoder's relative-position bias (every layer's)
    encoder_norm
    decoder_blocks/        {attn_norm, attn, cross_norm, cross_attn, mlp_norm, mlp}
    decoder_rel_bias, decoder_norm
    lm_head                D x V, only when model.tie_embeddings is false
mlp is {w_in, w_out} (model.gated_mlp false) or {w_gate, w_up, w_down}. The initialisation is
T5's own (Mesh TensorFlow's, transformers' with initializer_factor 1: embedding std 1, each
projection std fan_in**-0.5, wq also (head_dim)**-0.5); model.init_std is not used.

Rows may pack several examples (t5x/seqio packing): encoder and decoder inputs each carry
segment ids (1, 2, ... per example, 0 = padding) and positions restarting at 0 per example.
Encoder self-attention stays within a segment, decoder self-attention is causal within a
segment, and decoder segment k cross-attends to encoder segment k only; relative positions
come from the given positions, so a packed row computes what its examples compute alone.
Without segment ids every position is one example; decode's `enc_segment_ids_BxS` then
marks the encoder's real tokens (1) and padding (0).

Generation: `init_cache(enc, enc_segment_ids, max_len)` computes every decoder layer's
cross-attention keys and values once; `decode_step(tokens_BxN, cache)` appends N tokens at
the cache's index and returns their logits; `select_rows(cache, rows)` (module level)
reorders the batch (beam search). Step by step equals `decode` over the whole sequence.
Both take `layers`, each decoder layer's parameters apart (`unstack_decoder(params)`,
module level; `restack_decoder` joins them again): a generator prepares them once, and its
token loop then runs the layers one after another, reading their weights in place, instead
of a scan over the stacked layers that slices every layer's weights out of the stack at
every token (on CPU, copies costing about twice the step's matmuls).

The attention is plain XLA einsums: its scores carry the position bias, so model.attention
must be "xla" (or "auto", which is xla here), and the bucket settings must make sense
(relative_buckets >= 4, relative_max_distance > relative_buckets // 2): the t5 record of
jaxlm.model.zoo checks both.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.model import counts
from jaxlm.model.decoder import run_blocks
from jaxlm.model.layers import RMSNorm, param
from jaxlm.model.t5_layers import (
    ACT_AXES,
    BIAS_AXES,
    CACHE_AXES,
    DecoderBlock,
    EncoderBlock,
    T5Cache,
    cross_visible,
    mask_bias,
    relative_bias,
    select_rows,
    self_visible,
)
from jaxlm.model.zoo import decoder_layers
from jaxlm.parallel.rules import constrain

__all__ = ["T5", "T5Cache", "restack_decoder", "select_rows", "unstack_decoder"]


def _make_stack(block: type, cfg: ml_collections.ConfigDict, n_layers: int, rngs: nnx.Rngs):
    """n_layers blocks with a leading "layers" axis on every parameter (nnx.vmap)."""
    head_dim, dtype = counts.head_dim(cfg), jnp.dtype(cfg.dtype)

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs):
        return block(cfg, head_dim, dtype, rngs)

    return make(rngs)


class T5(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the graphdef
        d, h = cfg.d_model, cfg.n_heads
        self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), 1.0)
        self.encoder_blocks = _make_stack(EncoderBlock, cfg, cfg.n_layers, rngs)
        self.encoder_rel_bias = param(rngs, (cfg.relative_buckets, h), ("positions", "heads"),
                                      d ** -0.5)
        self.encoder_norm = RMSNorm(d, cfg.norm_eps)
        self.decoder_blocks = _make_stack(DecoderBlock, cfg, decoder_layers(cfg), rngs)
        self.decoder_rel_bias = param(rngs, (cfg.relative_buckets, h), ("positions", "heads"),
                                      d ** -0.5)
        self.decoder_norm = RMSNorm(d, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), d ** -0.5)

    # ---- training and scoring ----------------------------------------------------------------

    def __call__(self, inputs_BxS: jax.Array, decoder_inputs_BxT: jax.Array, *,
                 input_positions: jax.Array | None = None,
                 input_segment_ids: jax.Array | None = None,
                 decoder_positions: jax.Array | None = None,
                 decoder_segment_ids: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits (float32, B x T x V) of the decoder inputs given the encoder
        inputs (module docstring: packing, padding)."""
        enc_BxSxD = self.encode(inputs_BxS, input_positions, input_segment_ids)
        return self.decode(decoder_inputs_BxT, enc_BxSxD, enc_segment_ids_BxS=input_segment_ids,
                           positions_BxT=decoder_positions, segment_ids_BxT=decoder_segment_ids)

    def encode(self, tokens_BxS: jax.Array, positions_BxS: jax.Array | None = None,
               segment_ids_BxS: jax.Array | None = None) -> jax.Array:
        """The encoder output after its final norm, B x S x D in the compute dtype."""
        cfg = self.cfg
        positions_BxS = _positions(tokens_BxS, positions_BxS)
        bias = relative_bias(self.encoder_rel_bias[...], positions_BxS, positions_BxS,
                             bidirectional=True, max_distance=cfg.relative_max_distance)
        visible = self_visible(segment_ids_BxS, tokens_BxS.shape[1], causal=False)
        bias = constrain(bias if visible is None else bias + mask_bias(visible), BIAS_AXES)
        x_BxSxD, _ = run_blocks(self.encoder_blocks, cfg, self._embed(tokens_BxS), bias)
        return constrain(self.encoder_norm(x_BxSxD), ACT_AXES)

    def decode(self, decoder_tokens_BxT: jax.Array, enc_BxSxD: jax.Array, *,
               enc_segment_ids_BxS: jax.Array | None = None,
               positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None) -> jax.Array:
        """Teacher-forced decoder logits (float32, B x T x V) over the encoder output."""
        cfg = self.cfg
        length = decoder_tokens_BxT.shape[1]
        positions_BxT = _positions(decoder_tokens_BxT, positions_BxT)
        self_bias = relative_bias(self.decoder_rel_bias[...], positions_BxT, positions_BxT,
                                  bidirectional=False, max_distance=cfg.relative_max_distance)
        self_bias = constrain(self_bias + mask_bias(self_visible(segment_ids_BxT, length, True)),
                              BIAS_AXES)
        visible = cross_visible(segment_ids_BxT, enc_segment_ids_BxS, length)
        cross_bias = jnp.zeros((1, 1, 1, 1), jnp.float32) if visible is None else mask_bias(visible)
        x_BxTxD, _ = run_blocks(self.decoder_blocks, cfg, self._embed(decoder_tokens_BxT),
                                enc_BxSxD.astype(jnp.dtype(cfg.dtype)), self_bias, cross_bias,
                                n_layers=decoder_layers(cfg))
        return self._logits(self.decoder_norm(x_BxTxD))

    # ---- generation --------------------------------------------------------------------------

    def init_cache(self, enc_BxSxD: jax.Array, enc_segment_ids_BxS: jax.Array | None,
                   max_len: int, layers: Sequence[dict] | None = None) -> T5Cache:
        """An empty cache for `max_len` decoder tokens over this encoder output: every decoder
        layer's cross-attention keys and values, computed once; `enc_segment_ids_BxS` marks
        the encoder's real tokens (nonzero) and its padding (0); None: no padding. `layers`:
        as decode_step's."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        enc_BxSxD = enc_BxSxD.astype(dtype)
        b, s = enc_BxSxD.shape[:2]
        graphdef, stacked = nnx.split(self.decoder_blocks)

        def keys_values(layer_params):
            return nnx.merge(graphdef, layer_params).cross_attn.keys_values(enc_BxSxD)

        if layers is None:
            cross_k, cross_v = jax.lax.map(keys_values, stacked)
        else:
            cross_k, cross_v = (jnp.stack(a) for a in zip(*map(keys_values, layers)))
        shape = (decoder_layers(cfg), b, cfg.n_heads, max_len, counts.head_dim(cfg))
        zeros = constrain(jnp.zeros(shape, dtype), CACHE_AXES)
        visible = (jnp.ones((b, s), bool) if enc_segment_ids_BxS is None
                   else enc_segment_ids_BxS != 0)
        return T5Cache(k=zeros, v=zeros, cross_k=constrain(cross_k, CACHE_AXES),
                       cross_v=constrain(cross_v, CACHE_AXES),
                       cross_bias=mask_bias(visible)[:, None, None, :],
                       index=jnp.zeros((), jnp.int32))

    def decode_step(self, tokens_BxN: jax.Array, cache: T5Cache,
                    layers: Sequence[dict] | None = None) -> tuple[jax.Array, T5Cache]:
        """Appends N tokens at the cache's index (positions index .. index+N-1 in every row):
        their logits (float32, B x N x V) and the cache with them written and its index
        advanced. The caller keeps index + N <= max_len.

        `layers`: each decoder layer's parameters apart (`unstack_decoder(params)[1]`),
        prepared once outside the token loop; the layers then run one after another (a
        Python loop) and read their weights in place. Without them a scan over the stacked
        layers slices each layer's weights out of the stack at every step: on CPU, copies
        costing about twice the step's matmuls. Both compute the same logits."""
        cfg = self.cfg
        n, slots = tokens_BxN.shape[1], cache.max_len
        pos_1xN = (cache.index + jnp.arange(n, dtype=jnp.int32))[None]
        slot_1xT = jnp.arange(slots, dtype=jnp.int32)[None]
        table = self.decoder_rel_bias[...]
        rel = dict(bidirectional=False, max_distance=cfg.relative_max_distance)
        bias_cache = (relative_bias(table, pos_1xN, slot_1xT, **rel)
                      + mask_bias(slot_1xT < cache.index)[:, None, None, :])
        bias_new = (relative_bias(table, pos_1xN, pos_1xN, **rel)
                    + mask_bias(self_visible(None, n, causal=True)))
        biases = (bias_cache, bias_new, cache.cross_bias)
        graphdef, stacked = nnx.split(self.decoder_blocks)

        def layer(x, xs):
            layer_params, k, v, cross_k, cross_v = xs
            return nnx.merge(graphdef, layer_params).step(x, k, v, cross_k, cross_v, biases)

        x_BxNxD = self._embed(tokens_BxN)
        caches = (cache.k, cache.v, cache.cross_k, cache.cross_v)
        if layers is None:
            x_BxNxD, (k_new, v_new) = jax.lax.scan(layer, x_BxNxD, (stacked, *caches))
        else:
            if len(layers) != cache.k.shape[0]:
                raise ValueError(f"decode_step: {len(layers)} layers given for a cache of "
                                 f"{cache.k.shape[0]} decoder layers")
            new = []
            for i, layer_params in enumerate(layers):
                x_BxNxD, kv = layer(x_BxNxD, (layer_params, *(c[i] for c in caches)))
                new.append(kv)
            k_new, v_new = (jnp.stack(a) for a in zip(*new))

        def write(cache_NxBxHxTxK, new_NxBxHxNxK):
            updated = jax.lax.dynamic_update_slice_in_dim(
                cache_NxBxHxTxK, new_NxBxHxNxK.astype(cache_NxBxHxTxK.dtype), cache.index, axis=3)
            return constrain(updated, CACHE_AXES)

        cache = cache.replace(k=write(cache.k, k_new), v=write(cache.v, v_new),
                              index=cache.index + n)
        return self._logits(self.decoder_norm(x_BxNxD)), cache

    # ---- shared pieces -------------------------------------------------------------------------

    def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
        # The table's fsdp shards are gathered first (as jaxlm.model.decoder does).
        embed_VxD = constrain(self.embed[...], ("vocab", None))
        x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x_BxLxD, ACT_AXES)

    def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """Tied: (x * d_model**-0.5) @ embed.T, as transformers rescales a tied T5 head;
        untied: x @ lm_head."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if cfg.tie_embeddings:
            x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** -0.5, x_BxLxD.dtype)
            head_DxV = self.embed[...].T
        else:
            head_DxV = self.lm_head[...]
        logits = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "sequence", "act_vocab"))


def unstack_decoder(params: dict) -> tuple[dict, tuple[dict, ...]]:
    """A T5 parameter tree (nested dict) as (the tree without "decoder_blocks", each
    decoder layer's parameters: its slice of every decoder_blocks array, sharded as the
    stack is): what a generator keeps instead of the stacked decoder, so that
    `init_cache` and `decode_step` read the layers (their `layers`) without slicing them
    out of the stack at every token and without a second copy of the decoder's weights.
    `restack_decoder` is its inverse."""
    rest = {name: value for name, value in params.items() if name != "decoder_blocks"}
    return rest, _layer_slices(params["decoder_blocks"])


@jax.jit
def _layer_slices(stacked: dict) -> tuple[dict, ...]:
    depth = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth))


def restack_decoder(rest: dict, layers: Sequence[dict]) -> dict:
    """The parameter tree of `unstack_decoder`'s parts. Under jit, when nothing reads the
    stacked decoder (generation given `layers`), XLA drops the stacking: no copy is made."""
    return {**rest, "decoder_blocks": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def _positions(tokens_BxL: jax.Array, positions_BxL: jax.Array | None) -> jax.Array:
    if positions_BxL is None:
        return jnp.arange(tokens_BxL.shape[1], dtype=jnp.int32)[None]
    return positions_BxL
