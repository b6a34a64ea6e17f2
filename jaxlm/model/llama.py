"""The LLaMA network: RMSNorm, rotary position embeddings (theta and linear / llama3
rescaling as configured), grouped-query attention, SwiGLU MLP, no biases except optional
q/k/v biases (Qwen2). Mistral and Qwen2 checkpoints have this shape too. (Its checks and
counts: the llama record of jaxlm.model.zoo.)"""

from __future__ import annotations

import ml_collections

from jaxlm.model.decoder import DecoderLM
from jaxlm.model.layers import RMSNorm, SwiGLU, rope_spec


class Llama(DecoderLM):
    norm = RMSNorm
    mlp = SwiGLU

    @staticmethod
    def attention_options(cfg: ml_collections.ConfigDict) -> dict:
        return dict(use_bias=False, rope_theta=rope_spec(cfg), qkv_bias=cfg.qkv_bias)
