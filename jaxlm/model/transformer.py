"""The decoder-only Transformer, LLaMA- or GPT-2-style, with layers stacked under a scan.

The layer stack is created once with `nnx.vmap` (every parameter gains a leading `layers`
axis) and applied with `jax.lax.scan`, so compile time does not grow with depth.
Rematerialisation wraps one layer: "full" recomputes everything in the backward pass,
"save_matmuls" keeps the outputs of weight matmuls, "none" keeps all activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.model import attention, kv_cache
from jaxlm.model.attention import Attention
from jaxlm.model.layers import GeluMLP, SwiGLU, make_norm, param, rope_spec
from jaxlm.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

ACT_AXES = ("batch", "sequence", "act_embed")


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        llama = cfg.family == "llama"
        std = cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5  # residual projections, as GPT-2
        self.attn_norm = make_norm(cfg.family, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(
            d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            head_dim=config_lib.head_dim(cfg), use_bias=not llama,
            rope_theta=rope_spec(cfg) if llama else None, std=std, out_std=out_std,
            dtype=dtype, backend=cfg.attention, rngs=rngs, qkv_bias=llama and cfg.qkv_bias)
        self.mlp_norm = make_norm(cfg.family, cfg.d_model, cfg.norm_eps)
        mlp_cls = SwiGLU if llama else GeluMLP
        self.mlp = mlp_cls(cfg.d_model, cfg.d_ff, std, out_std, dtype, rngs)

    def __call__(self, x_BxLxD, positions_BxL, mask, cache=None):
        """With `cache` (generation, see kv_cache.py) returns (x, cache updated)."""
        attn_out = self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask, cache)
        attn_BxLxD, cache = attn_out if cache is not None else (attn_out, None)
        x_BxLxD = constrain(x_BxLxD + attn_BxLxD, ACT_AXES)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        x_BxLxD = constrain(x_BxLxD, ACT_AXES)
        return x_BxLxD if cache is None else (x_BxLxD, cache)


class Transformer(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the graphdef
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.family == "gpt2":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("positions", "embed"),
                                   cfg.init_std / 2)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = make_norm(cfg.family, cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                 cfg.init_std)

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, cache: kv_cache.KVCache | None = None):
        """Logits (float32, B x L x V). Positions default to 0..L-1; segment ids (documents
        packed in one row, 0 = padding) restrict attention to the same document.
        With `cache` (generation): the tokens are written into the KV cache and attend to
        it; returns (logits of the last position only, B x 1 x V; the updated cache)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        x_BxLxD = self._embed(tokens_BxL, positions_BxL)

        if cache is not None:
            x_BxLxD, cache = kv_cache.run_blocks(self.blocks, cfg, x_BxLxD, positions_BxL, cache)
            x_BxLxD = x_BxLxD[:, -1:]  # generation needs the next token's logits only
        else:
            mask = attention.prepare_mask(cfg.attention, segment_ids_BxL, tokens_BxL.shape[1],
                                          cfg.n_heads // cfg.n_kv_heads)
            x_BxLxD = self._run_blocks(x_BxLxD, positions_BxL, mask)

        x_BxLxD = self.final_norm(x_BxLxD)
        head_DxV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(dtype),
                            preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "sequence", "act_vocab"))
        return logits if cache is None else (logits, cache)

    def hidden_states(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                      segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """The final-normed hidden states (B x L x D, compute dtype) the LM head reads; a
        classification head pools them (jaxlm/finetune/classify.py)."""
        cfg = self.cfg
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        mask = attention.prepare_mask(cfg.attention, segment_ids_BxL, tokens_BxL.shape[1],
                                      cfg.n_heads // cfg.n_kv_heads)
        x_BxLxD = self._run_blocks(self._embed(tokens_BxL, positions_BxL), positions_BxL, mask)
        return self.final_norm(x_BxLxD)

    def _embed(self, tokens_BxL, positions_BxL):
        # Gather the table's fsdp shards first (as FSDP does for any weight): a lookup into a
        # table sharded along embed would come out sharded along embed, not batch.
        embed_VxD = constrain(self.embed[...], ("vocab", None))
        x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0)
        if self.cfg.family == "gpt2":
            pos_PxD = constrain(self.pos_embed[...], (None, None))
            x_BxLxD = x_BxLxD + jnp.take(pos_PxD, positions_BxL, axis=0)
        return constrain(x_BxLxD.astype(jnp.dtype(self.cfg.dtype)), ACT_AXES)

    def _run_blocks(self, x_BxLxD, positions_BxL, mask):
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x, positions_BxL, mask), None

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat],
                                   prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, stacked)
            return x_BxLxD
        for i in range(self.cfg.n_layers):
            x_BxLxD, _ = layer(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], stacked))
        return x_BxLxD


def create(cfg: ml_collections.ConfigDict, seed: int = 0) -> Transformer:
    """An unsharded model (tests and small tools); training creates it sharded instead."""
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, nnx.Rngs(params=seed))


def param_count(cfg: ml_collections.ConfigDict) -> int:
    """Analytic parameter count (tests check it against the real model)."""
    d, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    h, g, k = cfg.n_heads, cfg.n_kv_heads, config_lib.head_dim(cfg)
    attn = d * h * k + 2 * d * g * k + h * k * d
    if cfg.family == "llama":
        per_layer = attn + 3 * d * f + 2 * d + ((h * k + 2 * g * k) if cfg.qkv_bias else 0)
        total = v * d + n * per_layer + d
    else:
        per_layer = attn + (h * k + 2 * g * k + d) + 2 * d * f + f + d + 4 * d
        total = v * d + cfg.max_seq_len * d + n * per_layer + 2 * d
    return total + (0 if cfg.tie_embeddings else d * v)
