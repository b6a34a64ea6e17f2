"""Hugging Face config.json <-> jaxlm `model` config, per architecture.

Import accepts model_type llama, mistral, qwen2 (jaxlm family "llama") and gpt2, in the
config.json layouts of transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`). Everything jaxlm would compute differently is refused with the key named
(another activation, biases jaxlm lacks, rope types other than linear/llama3, partial rotary).

Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window): token q attends to
keys k with q - k < window. For sequences no longer than the window that is plain causal
attention, so such a model is imported with model.max_seq_len = window: exact on every
length jaxlm accepts (longer prompts are refused by the length checks), and a note says so.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxlm import config as config_lib

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}


class HFConfigError(ValueError):
    """config.json describes a model jaxlm cannot reproduce exactly; the message names the key."""


def _get(config: dict, key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise HFConfigError(f"{where}: missing key {key!r}")
    return config[key]


def _require(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise HFConfigError(f"{where}: {key} {message}")


def model_config(config: dict, where: str = "config.json"
                 ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(jaxlm model config, notes for the user) of a Hugging Face config.json."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise HFConfigError(f"{where}: unsupported architecture model_type={model_type!r} "
                            f"(architectures {config.get('architectures')}); jaxlm converts "
                            f"{', '.join(SUPPORTED)}")
    cfg = config_lib.defaults().model
    cfg.dtype = "float32"
    notes: list[str] = []
    if model_type == "gpt2":
        _gpt2(config, cfg, where)
    else:
        _llama(config, cfg, where, notes)
    cfg.vocab_size = int(_get(config, "vocab_size", where))
    _require(cfg.n_heads % cfg.n_kv_heads == 0, where, "num_key_value_heads",
             f"={cfg.n_kv_heads} does not divide num_attention_heads={cfg.n_heads}")
    return cfg, notes


def _gpt2(config: dict, cfg: ml_collections.ConfigDict, where: str) -> None:
    cfg.family = "gpt2"
    cfg.d_model = int(_get(config, "n_embd", where))
    cfg.n_layers = int(_get(config, "n_layer", where))
    cfg.n_heads = cfg.n_kv_heads = int(_get(config, "n_head", where))
    _require(cfg.d_model % cfg.n_heads == 0, where, "n_embd", "is not divisible by n_head")
    cfg.head_dim = cfg.d_model // cfg.n_heads
    cfg.d_ff = int(config.get("n_inner") or 4 * cfg.d_model)
    cfg.max_seq_len = int(_get(config, "n_positions", where))
    cfg.norm_eps = float(config.get("layer_norm_epsilon", 1e-5))
    cfg.tie_embeddings = bool(config.get("tie_word_embeddings", True))
    act = config.get("activation_function", "gelu_new")
    _require(act in GELU_TANH, where, "activation_function",
             f"={act!r} is not supported (jaxlm's GPT-2 MLP uses the tanh GELU: {GELU_TANH})")
    _require(config.get("scale_attn_weights", True), where, "scale_attn_weights",
             "=false is not supported")
    _require(not config.get("scale_attn_by_inverse_layer_idx", False), where,
             "scale_attn_by_inverse_layer_idx", "=true is not supported")
    _require(not config.get("add_cross_attention", False), where, "add_cross_attention",
             "=true is not supported")


def _llama(config: dict, cfg: ml_collections.ConfigDict, where: str, notes: list[str]) -> None:
    model_type = config["model_type"]
    cfg.family = "llama"
    cfg.d_model = int(_get(config, "hidden_size", where))
    cfg.n_layers = int(_get(config, "num_hidden_layers", where))
    cfg.n_heads = int(_get(config, "num_attention_heads", where))
    cfg.n_kv_heads = int(config.get("num_key_value_heads") or cfg.n_heads)
    cfg.head_dim = int(config.get("head_dim") or cfg.d_model // cfg.n_heads)
    cfg.d_ff = int(_get(config, "intermediate_size", where))
    cfg.max_seq_len = int(config.get("max_position_embeddings") or 2048)
    cfg.norm_eps = float(config.get("rms_norm_eps", 1e-6))
    cfg.tie_embeddings = bool(config.get("tie_word_embeddings", False))
    act = config.get("hidden_act", "silu")
    _require(act == "silu", where, "hidden_act", f"={act!r} is not supported (SwiGLU uses silu)")
    _require(not config.get("mlp_bias", False), where, "mlp_bias", "=true is not supported")
    if model_type == "qwen2":
        cfg.qkv_bias = True  # Qwen2 always has q/k/v biases and no output bias
    else:
        _require(not config.get("attention_bias", False), where, "attention_bias",
                 "=true (biases on q, k, v and o) is not supported")
    _rope(config, cfg, where)
    window = _sliding_window(config)
    if window is not None and window < cfg.max_seq_len:
        notes.append(f"sliding_window={window} < max_position_embeddings={cfg.max_seq_len}: "
                     f"imported with model.max_seq_len={window}, where windowed and full causal "
                     f"attention are identical")
        cfg.max_seq_len = window


def _sliding_window(config: dict) -> int | None:
    window = config.get("sliding_window")
    if not window:
        return None
    if config["model_type"] == "qwen2":
        layer_types = config.get("layer_types") or []
        if not config.get("use_sliding_window", False) and "sliding_attention" not in layer_types:
            return None
    return int(window)


def _rope(config: dict, cfg: ml_collections.ConfigDict, where: str) -> None:
    """rope_theta and scaling from `rope_parameters` (transformers 5) or `rope_theta` and
    `rope_scaling` (transformers 4)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise HFConfigError(f"{where}: rope_parameters per layer type are not supported")
    key = "rope_parameters" if params else "rope_scaling"
    scaling = dict(params or config.get("rope_scaling") or {})
    cfg.rope_theta = float(scaling.get("rope_theta") or config.get("rope_theta") or 10_000.0)
    partial = scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    _require(partial in (None, 1, 1.0), where, "partial_rotary_factor",
             f"={partial} is not supported (rotary embeddings on the whole head)")
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    s = cfg.rope_scaling
    if kind == "default":
        return
    if kind not in ("linear", "llama3"):
        raise HFConfigError(f"{where}: {key}.rope_type={kind!r} is not supported "
                            f"(jaxlm has default, linear and llama3)")
    s.type = kind
    s.factor = float(_get(scaling, "factor", f"{where}: {key}"))
    if kind == "llama3":
        s.low_freq_factor = float(_get(scaling, "low_freq_factor", f"{where}: {key}"))
        s.high_freq_factor = float(_get(scaling, "high_freq_factor", f"{where}: {key}"))
        s.original_max_len = int(scaling.get("original_max_position_embeddings")
                                 or config.get("original_max_position_embeddings")
                                 or cfg.max_seq_len)


# ---- export -------------------------------------------------------------------------------

def hf_config(model_cfg: ml_collections.ConfigDict, dtype: str,
              special: dict[str, int | None]) -> dict[str, Any]:
    """The config.json of a jaxlm model: gpt2, qwen2 (llama with q/k/v biases) or llama.
    Written in the transformers 4 layout (rope_theta, rope_scaling), which 5 reads too."""
    m = model_cfg
    base = {"bos_token_id": special.get("bos_id"), "eos_token_id": special.get("eos_id"),
            "pad_token_id": special.get("pad_id"), "tie_word_embeddings": bool(m.tie_embeddings),
            "vocab_size": int(m.vocab_size), "torch_dtype": dtype, "use_cache": True}
    if m.family == "gpt2":
        return {"architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2", **base,
                "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
                "n_inner": m.d_ff, "n_positions": m.max_seq_len,
                "layer_norm_epsilon": m.norm_eps, "activation_function": "gelu_new",
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0}
    model_type = "qwen2" if m.qkv_bias else "llama"
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, **base,
           "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
           "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
           "head_dim": config_lib.head_dim(m), "intermediate_size": m.d_ff,
           "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu", "rope_theta": float(m.rope_theta),
           "rope_scaling": _rope_scaling(m.rope_scaling), "attention_dropout": 0.0}
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _rope_scaling(s: ml_collections.ConfigDict) -> dict[str, Any] | None:
    if s.type == "none":
        return None
    if s.type == "linear":
        return {"rope_type": "linear", "factor": float(s.factor)}
    return {"rope_type": "llama3", "factor": float(s.factor),
            "low_freq_factor": float(s.low_freq_factor),
            "high_freq_factor": float(s.high_freq_factor),
            "original_max_position_embeddings": int(s.original_max_len)}
