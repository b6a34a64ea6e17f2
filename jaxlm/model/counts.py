"""What a model config implies, without building the model: head size and the analytic
model FLOPs of a training step.

Model FLOPs per trained token (a matmul of m x n by n x k costs 2mnk; the backward pass
costs twice the forward):

    6 * N_matmul + 6 * n_layers * seq_len * n_heads * head_dim

N_matmul counts parameters that take part in matmuls (its family says which: attention and
MLP weights of every layer plus the output head, D x V, counted also when tied to the
embedding); it excludes the embedding lookup, position tables, norms and biases. The
attention term is the QK^T and PV matmuls, 12 * n_layers * seq_len * n_heads * head_dim per
token for full attention, halved because a causal mask makes half of it unnecessary.
Recomputation from remat is not counted: MFU measures useful work.

Two variations of the same count, for fine-tuning:
  - frozen weights (LoRA's base): their weight-gradient matmuls are not computed, so they
    cost 4 (forward and input gradient) instead of 6 per parameter; trained adapter
    parameters cost 6.
  - no LM head (a classifier reads pooled hidden states): the D x V head is left out.
"""

from __future__ import annotations

import ml_collections


def head_dim(model_cfg: ml_collections.ConfigDict) -> int:
    """model.head_dim, or d_model // n_heads when it is 0."""
    return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def attention_params(model_cfg: ml_collections.ConfigDict) -> int:
    """The q, k, v and o projection weights of one layer (grouped-query: k and v have
    n_kv_heads heads)."""
    d, h, g, k = model_cfg.d_model, model_cfg.n_heads, model_cfg.n_kv_heads, head_dim(model_cfg)
    return 2 * d * h * k + 2 * d * g * k


def matmul_params(model_cfg: ml_collections.ConfigDict, mlp_matrices: int) -> int:
    """Weights that take part in matmuls: every layer's attention projections and its
    `mlp_matrices` D x F MLP matrices, plus the D x V output head."""
    mlp = mlp_matrices * model_cfg.d_model * model_cfg.d_ff
    return model_cfg.n_layers * (attention_params(model_cfg) + mlp) + \
        model_cfg.d_model * model_cfg.vocab_size


def attention_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int, *,
                              causal: bool = True) -> float:
    """Self-attention's score and value matmuls, forward and backward, per token: half of
    the full count when causal."""
    full = 12.0 * model_cfg.n_layers * seq_len * model_cfg.n_heads * head_dim(model_cfg)
    return full / 2 if causal else full


def train_flops_per_token(matmul_params: int, head_params: int, attention_flops: float, *,
                          lm_head: bool = True, frozen: bool = False,
                          adapter_params: int = 0) -> float:
    """Training FLOPs per token (module docstring). `matmul_params` includes the head's
    `head_params` (D x V); `lm_head=False` leaves them out, `frozen` counts the weights as
    frozen (4 per parameter) and adds `adapter_params` trained ones (6 each);
    `attention_flops`: the attention matmuls' (attention_flops_per_token)."""
    weights = matmul_params - (0 if lm_head else head_params)
    per_weight = 4.0 if frozen else 6.0
    return per_weight * weights + 6.0 * adapter_params + attention_flops


def encoder_decoder_flops_per_step(model_cfg: ml_collections.ConfigDict, enc_len: int,
                                   dec_len: int) -> float:
    """Training FLOPs of one encoder-decoder example (t5): `enc_len` encoder tokens,
    `dec_len` decoder tokens. Each weight costs 6 per token it multiplies: encoder layers
    and the cross-attention's k/v projections multiply encoder tokens; the decoder's
    self-attention, cross-attention q/o, MLP and the D x V head multiply decoder tokens.
    Attention matmuls: encoder self-attention full, decoder self-attention causal,
    cross-attention full over the encoder length."""
    m = model_cfg
    d, hk = m.d_model, m.n_heads * head_dim(m)
    attn = attention_params(m)
    mlp = (3 if m.gated_mlp else 2) * d * m.d_ff
    n_enc, n_dec = m.n_layers, m.n_decoder_layers or m.n_layers
    encoder_weights = n_enc * (attn + mlp) + n_dec * 2 * d * hk  # + cross k, v
    decoder_weights = n_dec * (attn + 2 * d * hk + mlp) + d * m.vocab_size  # + cross q, o
    encoder_attention = 12.0 * n_enc * enc_len * hk
    decoder_attention = 6.0 * n_dec * dec_len * hk + 12.0 * n_dec * enc_len * hk
    return (enc_len * (6.0 * encoder_weights + encoder_attention)
            + dec_len * (6.0 * decoder_weights + decoder_attention))

