"""The GPT-2 family: LayerNorm, learned absolute positions, multi-head attention with
biases on every projection, tanh-GELU MLP with biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.model import counts
from jaxlm.model.attention import Attention
from jaxlm.model.decoder import DecoderLM, PreNormBlock
from jaxlm.model.layers import GeluMLP, LayerNorm, param
from jaxlm.parallel.rules import constrain


class GPT2(DecoderLM):
    @staticmethod
    def make_norm(cfg: ml_collections.ConfigDict) -> LayerNorm:
        return LayerNorm(cfg.d_model, cfg.norm_eps)

    @staticmethod
    def make_block(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> PreNormBlock:
        dtype = jnp.dtype(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # residual projections
        return PreNormBlock(
            attn_norm=GPT2.make_norm(cfg),
            attn=Attention(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                           head_dim=counts.head_dim(cfg), use_bias=True, rope_theta=None,
                           std=cfg.init_std, out_std=out_std, dtype=dtype,
                           backend=cfg.attention, rngs=rngs),
            mlp_norm=GPT2.make_norm(cfg),
            mlp=GeluMLP(cfg.d_model, cfg.d_ff, cfg.init_std, out_std, dtype, rngs))

    def init_positions(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
        self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("positions", "embed"),
                               cfg.init_std / 2)

    def add_positions(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        pos_PxD = constrain(self.pos_embed[...], (None, None))
        return x_BxLxD + jnp.take(pos_PxD, positions_BxL, axis=0)
