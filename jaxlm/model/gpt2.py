"""The GPT-2 network: LayerNorm, learned absolute positions, multi-head attention with
biases on every projection, tanh-GELU MLP with biases. (Its checks and counts: the gpt2
record of jaxlm.model.zoo.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.model.decoder import DecoderLM
from jaxlm.model.layers import GeluMLP, LayerNorm, param
from jaxlm.parallel.rules import constrain


class GPT2(DecoderLM):
    norm = LayerNorm
    mlp = GeluMLP

    @staticmethod
    def attention_options(cfg: ml_collections.ConfigDict) -> dict:
        return dict(use_bias=True, rope_theta=None)

    def init_positions(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
        self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("positions", "embed"),
                               cfg.init_std / 2)

    def add_positions(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        pos_PxD = constrain(self.pos_embed[...], (None, None))
        return x_BxLxD + jnp.take(pos_PxD, positions_BxL, axis=0)
