"""The `model` config section's checks: sizes, backends, rotary scaling, quantized weights
and the mixture-of-experts keys (no JAX; a model family's own constraints are
jaxlm.model.zoo's). `validate` of jaxlm.config.validate calls `check_model`."""

from __future__ import annotations

import ml_collections

from jaxlm.config.schema import (
    ACTIVATIONS,
    ATTENTION_BACKENDS,
    DTYPES,
    MAX_EXPERTS,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_SEQ_LEN,
    MAX_VOCAB,
    MAX_WIDTH,
    MOE_DISPATCHES,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    WEIGHT_FORMATS,
    require,
    require_int,
    require_real,
)


def _check_experts(m: ml_collections.ConfigDict) -> None:
    """The mixture-of-experts keys (family moe; 0 experts everywhere else)."""
    require_int(m.n_experts, "model.n_experts", 0, MAX_EXPERTS)
    require(m.family == "moe" or m.n_experts == 0, "model.n_experts",
            f"only family 'moe' has experts; family {m.family!r} has a dense MLP (set 0)")
    require(m.family != "moe" or m.n_experts >= 2, "model.n_experts",
            f"family='moe' needs at least 2 experts, got {m.n_experts}")
    require_int(m.experts_per_token, "model.experts_per_token", 1,
                m.n_experts or MAX_EXPERTS)  # top k (read only with experts)
    require_int(m.d_expert, "model.d_expert", 0, MAX_WIDTH)  # 0: d_ff
    require_int(m.d_shared, "model.d_shared", 0, MAX_WIDTH)  # 0: no shared expert
    for key in ("shared_gate", "router_norm_topk"):
        require(isinstance(m[key], bool), f"model.{key}", f"must be true or false, got {m[key]!r}")
    require(not m.shared_gate or m.d_shared > 0, "model.shared_gate",
            "gates the shared expert: set model.d_shared too")
    require(m.moe_dispatch in MOE_DISPATCHES, "model.moe_dispatch",
            f"{m.moe_dispatch!r} not in {MOE_DISPATCHES}")
    require_real(m.capacity_factor, "model.capacity_factor", 0, low_open=True)


def check_model(m: ml_collections.ConfigDict) -> None:
    require(m.remat in REMAT_POLICIES, "model.remat", f"{m.remat!r} not in {REMAT_POLICIES}")
    require(m.attention in ATTENTION_BACKENDS, "model.attention",
             f"{m.attention!r} not in {ATTENTION_BACKENDS}")
    require(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} not in {DTYPES}")
    for key in ("d_model", "d_ff"):
        require_int(m[key], f"model.{key}", 1, MAX_WIDTH)
    require_int(m.n_layers, "model.n_layers", 1, MAX_LAYERS)
    require_int(m.n_heads, "model.n_heads", 1, MAX_HEADS)
    require_int(m.n_kv_heads, "model.n_kv_heads", 1, MAX_HEADS)
    require_int(m.max_seq_len, "model.max_seq_len", 1, MAX_SEQ_LEN)
    require_int(m.head_dim, "model.head_dim", 0, MAX_WIDTH)  # 0: d_model // n_heads
    require(m.head_dim > 0 or m.d_model % m.n_heads == 0, "model.n_heads",
             f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}")
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}")
    # 0: the tokenizer's vocabulary, padded to data.vocab_multiple
    require_int(m.vocab_size, "model.vocab_size", 0, MAX_VOCAB)
    require_real(m.rope_theta, "model.rope_theta", 0, low_open=True)
    require_real(m.norm_eps, "model.norm_eps", 0, 1, low_open=True, high_open=True)
    require_real(m.init_std, "model.init_std", 0, low_open=True)
    _check_rope_scaling(m.rope_scaling)
    _check_weights(m)
    require(m.activation in ACTIVATIONS, "model.activation",
            f"{m.activation!r} not in {ACTIVATIONS}")
    require(isinstance(m.gated_mlp, bool), "model.gated_mlp",
            f"must be true or false, got {m.gated_mlp!r}")
    _check_experts(m)
    require_int(m.type_vocab_size, "model.type_vocab_size", 1, MAX_VOCAB)
    require_int(m.position_offset, "model.position_offset", 0, MAX_SEQ_LEN)
    require_int(m.n_decoder_layers, "model.n_decoder_layers", 0, MAX_LAYERS)  # 0: n_layers
    require_int(m.relative_buckets, "model.relative_buckets", 2, MAX_SEQ_LEN)
    require_int(m.relative_max_distance, "model.relative_max_distance", 1, MAX_SEQ_LEN)
    require_int(m.splash_block, "model.splash_block", 0, MAX_SEQ_LEN)  # 0: by sequence length


def grouped_dims(m: ml_collections.ConfigDict) -> dict[str, int]:
    """The sizes a quantized model's groups of inputs run along (jaxlm/model/quantized.py),
    by model key: a group size must divide each."""
    return {"d_model": m.d_model, "d_ff": m.d_ff, "head_dim": m.head_dim or m.d_model // m.n_heads}


def _check_weights(m: ml_collections.ConfigDict) -> None:
    """A quantized run's weight format, and a group size that divides every axis the
    groups run along (jaxlm/model/quantized.py)."""
    require(m.weights in WEIGHT_FORMATS, "model.weights",
            f"{m.weights!r} not in {WEIGHT_FORMATS}")
    require_int(m.weight_group, "model.weight_group", 0, MAX_WIDTH)
    if m.weights == "float":
        return
    for key, size in grouped_dims(m).items():
        require(not m.weight_group or size % m.weight_group == 0, "model.weight_group",
                f"{m.weight_group} does not divide model.{key}={size} (the {m.weights} "
                f"groups run along it)")
    if m.weights in ("int4", "nf4"):  # two codes a byte along each weight's last axis
        last = {**grouped_dims(m), **({} if m.tie_embeddings else {"vocab_size": m.vocab_size})}
        for key, size in last.items():
            require(size % 2 == 0, "model.weights",
                    f"{m.weights} packs two codes a byte along model.{key}, which is odd ({size})")


def _check_rope_scaling(s: ml_collections.ConfigDict) -> None:
    require(s.type in ROPE_SCALINGS, "model.rope_scaling.type", f"{s.type!r} not in {ROPE_SCALINGS}")
    require_real(s.factor, "model.rope_scaling.factor", 0, low_open=True)
    require_real(s.low_freq_factor, "model.rope_scaling.low_freq_factor", 0, low_open=True)
    require_real(s.high_freq_factor, "model.rope_scaling.high_freq_factor", 0, low_open=True)
    require_int(s.original_max_len, "model.rope_scaling.original_max_len", 1, MAX_SEQ_LEN)
    if s.type == "llama3":
        require(s.high_freq_factor > s.low_freq_factor, "model.rope_scaling.high_freq_factor",
                 "must be larger than low_freq_factor")
