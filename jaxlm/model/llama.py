"""The LLaMA family: RMSNorm, rotary position embeddings (theta and linear / llama3
rescaling as configured), grouped-query attention, SwiGLU MLP, no biases except optional
q/k/v biases (Qwen2). Mistral and Qwen2 checkpoints have this shape too."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.model import counts
from jaxlm.model.attention import Attention
from jaxlm.model.decoder import DecoderLM, PreNormBlock
from jaxlm.model.layers import RMSNorm, SwiGLU, rope_spec


class Llama(DecoderLM):
    @staticmethod
    def make_norm(cfg: ml_collections.ConfigDict) -> RMSNorm:
        return RMSNorm(cfg.d_model, cfg.norm_eps)

    @staticmethod
    def make_block(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> PreNormBlock:
        dtype = jnp.dtype(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # residual projections, as GPT-2
        return PreNormBlock(
            attn_norm=Llama.make_norm(cfg),
            attn=Attention(d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                           head_dim=counts.head_dim(cfg), use_bias=False,
                           rope_theta=rope_spec(cfg), std=cfg.init_std, out_std=out_std,
                           dtype=dtype, backend=cfg.attention, rngs=rngs, qkv_bias=cfg.qkv_bias),
            mlp_norm=Llama.make_norm(cfg),
            mlp=SwiGLU(cfg.d_model, cfg.d_ff, cfg.init_std, out_std, dtype, rngs))
