"""The BERT / RoBERTa encoder (family "bert"): bidirectional self-attention within each
document, learned absolute positions and token types, post-LayerNorm residual blocks, an
MLP with biases, and the masked-LM head tied to the embedding, computed as Hugging Face
BertForMaskedLM and RobertaForMaskedLM compute them. (Its checks and counts: the bert
record of jaxlm.model.zoo; its Hugging Face mapping: jaxlm.convert.bert.)

Parameter tree: `embed` (V x D), `pos_embed` (max_seq_len x D), `type_embed`
(type_vocab_size x D), `embed_norm`; `blocks/{attn, attn_norm, mlp, mlp_norm}` with a
leading `layers` axis, applied by the decoders' scan and remat (jaxlm.model.decoder); the
masked-LM head `head_dense` (D x D), `head_bias` (D), `head_norm`, `out_bias` (V):
logits = head_norm(act(x head_dense + head_bias)) embed^T + out_bias.

Positions: position p of a document reads row p + model.position_offset of `pos_embed`
(BERT 0; RoBERTa 2, its padding_idx + 1). Packed rows restart positions at each document
and segment ids keep each document's attention within itself (0 = padding: it attends to
padding only, and nothing attends to it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.model import attention, counts
from jaxlm.model.decoder import ACT_AXES, run_blocks
from jaxlm.model.layers import ACTIVATIONS, GeluMLP, LayerNorm, constant, dense, param
from jaxlm.parallel.rules import constrain


class PostNormBlock(nnx.Module):
    """Post-norm residual block (BERT): x = attn_norm(x + attn(x)), then
    x = mlp_norm(x + mlp(x))."""

    def __init__(self, attn: attention.Attention, attn_norm: LayerNorm, mlp: GeluMLP,
                 mlp_norm: LayerNorm):
        self.attn = attn
        self.attn_norm = attn_norm
        self.mlp = mlp
        self.mlp_norm = mlp_norm

    def __call__(self, x_BxLxD, positions_BxL, mask):
        x_BxLxD = self.attn_norm(x_BxLxD + self.attn(x_BxLxD, positions_BxL, mask))
        x_BxLxD = constrain(x_BxLxD, ACT_AXES)
        x_BxLxD = self.mlp_norm(x_BxLxD + self.mlp(x_BxLxD))
        return constrain(x_BxLxD, ACT_AXES)


def make_block(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> PostNormBlock:
    """One layer, its parameters drawn from the layer's rngs (normal(0, init_std) weights,
    as BERT initialises every matrix; zero biases, unit norm scales)."""
    dtype = jnp.dtype(cfg.dtype)
    std = cfg.init_std
    return PostNormBlock(
        attn=attention.Attention(
            d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
            head_dim=counts.head_dim(cfg), use_bias=True, rope_theta=None, std=std,
            out_std=std, dtype=dtype, backend=cfg.attention, rngs=rngs, causal=False),
        attn_norm=LayerNorm(cfg.d_model, cfg.norm_eps),
        mlp=GeluMLP(cfg.d_model, cfg.d_ff, std, std, dtype, rngs, activation=cfg.activation),
        mlp_norm=LayerNorm(cfg.d_model, cfg.norm_eps))


class Bert(nnx.Module):
    """The encoder and its masked-LM head (module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the graphdef
        d, std = cfg.d_model, cfg.init_std
        self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), std)
        self.pos_embed = param(rngs, (cfg.max_seq_len, d), ("positions", "embed"), std)
        # A few rows (2 for BERT): replicated, as no mesh axis divides them.
        self.type_embed = param(rngs, (cfg.type_vocab_size, d), (None, "embed"), std)
        self.embed_norm = LayerNorm(d, cfg.norm_eps)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> PostNormBlock:
            return make_block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        # Both axes are d_model, and a mesh axis shards one dimension: the output's is whole.
        self.head_dense = param(rngs, (d, d), ("embed", None), std)
        self.head_bias = constant((d,), ("embed",), 0.0)
        self.head_norm = LayerNorm(d, cfg.norm_eps)
        self.out_bias = constant((cfg.vocab_size,), ("vocab",), 0.0)

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None,
                 token_types_BxL: jax.Array | None = None) -> jax.Array:
        """Masked-LM logits (float32, B x L x V) at every position. Positions default to
        0..L-1 (one document per row); segment ids (documents packed in one row, 0 =
        padding) keep attention within each document; token types default to 0."""
        x_BxLxD = self.hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL, token_types_BxL)
        return self.head_logits(x_BxLxD)

    def hidden_states(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                      segment_ids_BxL: jax.Array | None = None,
                      token_types_BxL: jax.Array | None = None) -> jax.Array:
        """The last block's output (B x L x D, compute dtype), before the masked-LM head: what
        a classification or question-answering head reads."""
        cfg = self.cfg
        length = tokens_BxL.shape[1]
        if length + cfg.position_offset > cfg.max_seq_len:
            raise ConfigError(
                f"config.model.max_seq_len: {length} positions from offset "
                f"{cfg.position_offset} (model.position_offset) need {length + cfg.position_offset} "
                f"rows of the position table; it has {cfg.max_seq_len}")
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length), tokens_BxL.shape)
        x_BxLxD = self._embed(tokens_BxL, positions_BxL, token_types_BxL)
        mask = attention.prepare_mask(cfg, segment_ids_BxL, length, causal=False)
        return run_blocks(self.blocks, cfg, x_BxLxD, positions_BxL, mask)[0]

    def head_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """The masked-LM head over hidden states (any run of positions; the blockwise loss
        calls it block by block): float32 logits, B x L x V."""
        dt = jnp.dtype(self.cfg.dtype)
        h_BxLxD = dense(x_BxLxD, self.head_dense[...], dt) + self.head_bias[...].astype(dt)
        h_BxLxD = self.head_norm(ACTIVATIONS[self.cfg.activation](h_BxLxD))
        logits = jnp.einsum("bld,vd->blv", h_BxLxD, self.embed[...].astype(dt),
                            preferred_element_type=jnp.float32) + self.out_bias[...]
        return constrain(logits, ("batch", "act_sequence", "act_vocab"))

    def _embed(self, tokens_BxL, positions_BxL, token_types_BxL):
        # Tables gathered whole before the lookup (as DecoderLM._embed does for `embed`).
        embed_VxD = constrain(self.embed[...], ("vocab", None))
        pos_PxD = constrain(self.pos_embed[...], (None, None))
        types_TxD = constrain(self.type_embed[...], (None, None))
        x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0)
        if token_types_BxL is None:
            x_BxLxD = x_BxLxD + types_TxD[0]
        else:
            x_BxLxD = x_BxLxD + jnp.take(types_TxD, token_types_BxL, axis=0)
        x_BxLxD = x_BxLxD + jnp.take(pos_PxD, positions_BxL + self.cfg.position_offset, axis=0)
        x_BxLxD = self.embed_norm(x_BxLxD).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x_BxLxD, ACT_AXES)
