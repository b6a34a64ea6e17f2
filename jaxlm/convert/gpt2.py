"""Hugging Face mapping of the gpt2 family (model_type gpt2).

GPT-2's Conv1D weights are stored in x out (no transpose) and its q, k and v projections
fused along the output axis (split on import, joined on export). A checkpoint of
`GPT2LMHeadModel` names its tensors "transformer.*"; one of the bare `GPT2Model` does not.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxlm.convert.spec import Rule, dims, flag, integer, number, require, text

MODEL_TYPES = ("gpt2",)
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


def _prefix(tensor_names: Any) -> str:
    """"transformer." (GPT2LMHeadModel, and what export writes) unless the checkpoint's
    tensors are a bare GPT2Model's."""
    return "" if tensor_names is not None and "wte.weight" in tensor_names else "transformer."


def config_from_hf(config: dict, cfg: ml_collections.ConfigDict, where: str,
                   notes: list[str]) -> None:
    """Sets the model config's keys from a gpt2 config.json (n_inner: null means 4 x n_embd,
    as in transformers; any other null is an error naming the key)."""
    cfg.d_model = integer(config, "n_embd", where)
    cfg.n_layers = integer(config, "n_layer", where)
    cfg.n_heads = cfg.n_kv_heads = integer(config, "n_head", where)
    require(cfg.d_model % cfg.n_heads == 0, where, "n_embd", "is not divisible by n_head")
    cfg.head_dim = cfg.d_model // cfg.n_heads
    cfg.d_ff = integer(config, "n_inner", where, 4 * cfg.d_model, null=4 * cfg.d_model)
    cfg.max_seq_len = integer(config, "n_positions", where)
    cfg.norm_eps = number(config, "layer_norm_epsilon", where, 1e-5)
    cfg.tie_embeddings = flag(config, "tie_word_embeddings", where, True)
    act = text(config, "activation_function", where, "gelu_new")
    require(act in GELU_TANH, where, "activation_function",
            f"={act!r} is not supported (jaxlm's GPT-2 MLP uses the tanh GELU: {GELU_TANH})")
    require(flag(config, "scale_attn_weights", where, True), where, "scale_attn_weights",
            "=false is not supported")
    require(not flag(config, "scale_attn_by_inverse_layer_idx", where, False), where,
            "scale_attn_by_inverse_layer_idx", "=true is not supported")
    require(not flag(config, "add_cross_attention", where, False), where, "add_cross_attention",
            "=true is not supported")


def config_to_hf(m: ml_collections.ConfigDict, base: dict[str, Any]) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **base,
            "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
            "n_inner": m.d_ff, "n_positions": m.max_seq_len,
            "layer_norm_epsilon": m.norm_eps, "activation_function": "gelu_new",
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0}


def rules(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[Rule]:
    """Every tensor of the checkpoint, in the order Hugging Face writes them."""
    prefix = _prefix(tensor_names)
    d, h, g, k, f, v = dims(cfg)
    p = prefix + "h.{i}."
    out = [
        Rule(prefix + "wte.weight", (v, d), ("embed",)),
        Rule(prefix + "wpe.weight", (cfg.max_seq_len, d), ("pos_embed",)),
        Rule(p + "ln_1.weight", (d,), ("blocks/attn_norm/scale",)),
        Rule(p + "ln_1.bias", (d,), ("blocks/attn_norm/bias",)),
        # Conv1D: in x out, q|k|v concatenated along out.
        Rule(p + "attn.c_attn.weight", (d, 3 * h * k),
             ("blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv")),
        Rule(p + "attn.c_attn.bias", (3 * h * k,),
             ("blocks/attn/bq", "blocks/attn/bk", "blocks/attn/bv")),
        Rule(p + "attn.c_proj.weight", (h * k, d), ("blocks/attn/wo",)),
        Rule(p + "attn.c_proj.bias", (d,), ("blocks/attn/bo",)),
        Rule(p + "ln_2.weight", (d,), ("blocks/mlp_norm/scale",)),
        Rule(p + "ln_2.bias", (d,), ("blocks/mlp_norm/bias",)),
        Rule(p + "mlp.c_fc.weight", (d, f), ("blocks/mlp/w_in",)),
        Rule(p + "mlp.c_fc.bias", (f,), ("blocks/mlp/b_in",)),
        Rule(p + "mlp.c_proj.weight", (f, d), ("blocks/mlp/w_out",)),
        Rule(p + "mlp.c_proj.bias", (d,), ("blocks/mlp/b_out",)),
        Rule(prefix + "ln_f.weight", (d,), ("final_norm/scale",)),
        Rule(prefix + "ln_f.bias", (d,), ("final_norm/bias",)),
    ]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", (v, d), ("lm_head",), transpose=True))
    return out


def ignorable(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[str]:
    """Tensors a checkpoint may hold that carry no parameter: the causal-mask buffers, and an
    lm_head saved beside tied embeddings (HF ties it anyway)."""
    prefix = _prefix(tensor_names)
    return [f"{prefix}h.{{i}}.attn.bias", f"{prefix}h.{{i}}.attn.masked_bias"] + (
        ["lm_head.weight"] if cfg.tie_embeddings else [])
