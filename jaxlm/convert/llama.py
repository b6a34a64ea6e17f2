"""Hugging Face mapping of the llama family: model_type llama, mistral and qwen2.

Config: the config.json layouts of transformers 4.x (`rope_theta` + `rope_scaling`) and
5.x (`rope_parameters`). Everything jaxlm would compute differently is refused with the key
named (another activation, biases jaxlm lacks, rope types other than linear/llama3, partial
rotary). Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window): token q
attends to keys k with q - k < window. For sequences no longer than the window that is
plain causal attention, so such a model is imported with model.max_seq_len = window: exact
on every length jaxlm accepts (longer prompts are refused by the length checks), and a note
says so.

Tensors: LLaMA, Mistral and Qwen2 store q/k projections already in the half-split
("rotate_half") rotary layout that jaxlm uses, so no permutation is needed; RMSNorm scales
multiply after normalising in float32 as jaxlm does (the parity tests prove both).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxlm.convert.spec import (
    HFConfigError,
    Rule,
    dims,
    flag,
    integer,
    number,
    require,
    table,
    text,
)
from jaxlm.model import counts

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
QWEN = ("qwen2", "qwen2_moe")  # q/k/v biases (qkv_bias) and use_sliding_window
PROJ_NAMES = {part: f"{part}_proj" for part in ("gate", "up", "down")}  # HF's SwiGLU names


def config_from_hf(config: dict, cfg: ml_collections.ConfigDict, where: str,
                   notes: list[str]) -> None:
    """Sets the model config's keys from a llama, mistral or qwen2 config.json. null means
    what it means to transformers where it means anything (num_key_value_heads, head_dim,
    rope_scaling, sliding_window); elsewhere it is an error naming the key."""
    decoder_from_hf(config, cfg, where, notes)
    cfg.d_ff = integer(config, "intermediate_size", where)
    require(not flag(config, "mlp_bias", where, False), where, "mlp_bias", "=true is not supported")


def decoder_from_hf(config: dict, cfg: ml_collections.ConfigDict, where: str,
                    notes: list[str]) -> None:
    """Everything but the MLP (sizes, attention, norms, rotary embeddings, the window): the
    keys the llama family's model types share with the moe family's (jaxlm/convert/moe.py)."""
    model_type = config["model_type"]
    cfg.d_model = integer(config, "hidden_size", where)
    cfg.n_layers = integer(config, "num_hidden_layers", where)
    cfg.n_heads = integer(config, "num_attention_heads", where)
    cfg.n_kv_heads = integer(config, "num_key_value_heads", where, cfg.n_heads, null=cfg.n_heads)
    cfg.head_dim = integer(config, "head_dim", where, 0, null=0) or cfg.d_model // cfg.n_heads
    cfg.max_seq_len = integer(config, "max_position_embeddings", where, 2048)
    cfg.norm_eps = number(config, "rms_norm_eps", where, 1e-6)
    cfg.tie_embeddings = flag(config, "tie_word_embeddings", where, False)
    act = text(config, "hidden_act", where, "silu")
    require(act == "silu", where, "hidden_act", f"={act!r} is not supported (SwiGLU uses silu)")
    if model_type in QWEN:  # q/k/v biases (Qwen2 always; Qwen2-MoE by qkv_bias), no o bias
        cfg.qkv_bias = flag(config, "qkv_bias", where, True)
    else:
        require(not flag(config, "attention_bias", where, False), where, "attention_bias",
                "=true (biases on q, k, v and o) is not supported")
    _rope(config, cfg, where)
    window = _sliding_window(config, where)
    if window is not None and window < cfg.max_seq_len:
        notes.append(f"sliding_window={window} < max_position_embeddings={cfg.max_seq_len}: "
                     f"imported with model.max_seq_len={window}, where windowed and full causal "
                     f"attention are identical")
        cfg.max_seq_len = window


def _sliding_window(config: dict, where: str) -> int | None:
    """The attention window, or None (absent, null, or a Qwen2 model that does not use it)."""
    if config["model_type"] in QWEN:
        layer_types = config.get("layer_types") or []
        if not isinstance(layer_types, list):
            raise HFConfigError(f"{where}: layer_types={layer_types!r:.60} is not a list")
        if (not flag(config, "use_sliding_window", where, False)
                and "sliding_attention" not in layer_types):
            return None
    return integer(config, "sliding_window", where, None, null=None)


def _rope(config: dict, cfg: ml_collections.ConfigDict, where: str) -> None:
    """rope_theta and scaling from `rope_parameters` (transformers 5) or `rope_theta` and
    `rope_scaling` (transformers 4)."""
    params = table(config, "rope_parameters", where)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise HFConfigError(f"{where}: rope_parameters per layer type are not supported")
    key = "rope_parameters" if params else "rope_scaling"
    scaling = params or table(config, "rope_scaling", where) or {}
    theta = number(config, "rope_theta", where, 10_000.0)
    cfg.rope_theta = number(scaling, "rope_theta", where, theta, section=key)
    partial = number(config, "partial_rotary_factor", where, 1.0, null=1.0)
    partial = number(scaling, "partial_rotary_factor", where, partial, null=1.0, section=key)
    require(partial == 1.0, where, "partial_rotary_factor",
            f"={partial} is not supported (rotary embeddings on the whole head)")
    kind = text(scaling, "type", where, "default", null="default", section=key)
    kind = text(scaling, "rope_type", where, kind, null="default", section=key)
    s = cfg.rope_scaling
    if kind == "default":
        return
    if kind not in ("linear", "llama3"):
        raise HFConfigError(f"{where}: {key}.rope_type={kind!r} is not supported "
                            f"(jaxlm has default, linear and llama3)")
    s.type = kind
    s.factor = number(scaling, "factor", where, section=key)
    if kind == "llama3":
        s.low_freq_factor = number(scaling, "low_freq_factor", where, section=key)
        s.high_freq_factor = number(scaling, "high_freq_factor", where, section=key)
        original = integer(config, "original_max_position_embeddings", where, cfg.max_seq_len,
                           null=cfg.max_seq_len)
        s.original_max_len = integer(scaling, "original_max_position_embeddings", where,
                                     original, null=original, section=key)


def config_to_hf(m: ml_collections.ConfigDict, base: dict[str, Any]) -> dict[str, Any]:
    """config.json: qwen2 when the model has q/k/v biases, else llama; in the transformers 4
    layout (rope_theta, rope_scaling), which 5 reads too."""
    model_type = "qwen2" if m.qkv_bias else "llama"
    out = decoder_to_hf(m, base, model_type, ARCHITECTURES[model_type])
    out["intermediate_size"] = m.d_ff
    if model_type == "llama":
        out["mlp_bias"] = False
    return out


def decoder_to_hf(m: ml_collections.ConfigDict, base: dict[str, Any], model_type: str,
                  architecture: str) -> dict[str, Any]:
    """The config.json keys of everything but the MLP (as decoder_from_hf reads them)."""
    out = {"architectures": [architecture], "model_type": model_type, **base,
           "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
           "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
           "head_dim": counts.head_dim(m), "max_position_embeddings": m.max_seq_len,
           "rms_norm_eps": m.norm_eps, "hidden_act": "silu", "rope_theta": float(m.rope_theta),
           "rope_scaling": _rope_scaling(m.rope_scaling), "attention_dropout": 0.0}
    if model_type in QWEN:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
    else:
        out["attention_bias"] = False
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


def rules(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[Rule]:
    """Every tensor of the checkpoint, in the order Hugging Face writes them."""
    return decoder_rules(cfg, swiglu_rules("model.layers.{i}.mlp.", PROJ_NAMES, cfg.d_model,
                                           cfg.d_ff, "blocks/mlp/w_"))


def swiglu_rules(prefix: str, names: dict[str, str], d: int, f: int, param: str,
                 experts: int = 0) -> list[Rule]:
    """A SwiGLU's gate, up and down projections: HF tensors `prefix + names[part] +
    ".weight"` (torch Linear layout) to jaxlm's `param + part` (one per expert when
    `experts`: jaxlm.convert.moe)."""
    return [Rule(f"{prefix}{names[part]}.weight", (d, f) if part == "down" else (f, d),
                 (param + part,), transpose=True, experts=experts)
            for part in ("gate", "up", "down")]


def decoder_rules(cfg: ml_collections.ConfigDict, mlp: list[Rule]) -> list[Rule]:
    """The rules of every tensor but the MLP's, which `mlp` gives."""
    d, h, g, k, _, v = dims(cfg)
    p = "model.layers.{i}."
    out = [Rule("model.embed_tokens.weight", (v, d), ("embed",))]
    out += [
        Rule(p + "input_layernorm.weight", (d,), ("blocks/attn_norm/scale",)),
        Rule(p + "self_attn.q_proj.weight", (h * k, d), ("blocks/attn/wq",), transpose=True),
        Rule(p + "self_attn.k_proj.weight", (g * k, d), ("blocks/attn/wk",), transpose=True),
        Rule(p + "self_attn.v_proj.weight", (g * k, d), ("blocks/attn/wv",), transpose=True),
        Rule(p + "self_attn.o_proj.weight", (d, h * k), ("blocks/attn/wo",), transpose=True),
    ]
    if cfg.qkv_bias:
        out += [Rule(p + "self_attn.q_proj.bias", (h * k,), ("blocks/attn/bq",)),
                Rule(p + "self_attn.k_proj.bias", (g * k,), ("blocks/attn/bk",)),
                Rule(p + "self_attn.v_proj.bias", (g * k,), ("blocks/attn/bv",))]
    out += [
        Rule(p + "post_attention_layernorm.weight", (d,), ("blocks/mlp_norm/scale",)),
        *mlp,
        Rule("model.norm.weight", (d,), ("final_norm/scale",)),
    ]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", (v, d), ("lm_head",), transpose=True))
    return out


def ignorable(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[str]:
    """Tensors a checkpoint may hold that carry no parameter: cached rotary tables, and an
    lm_head saved beside tied embeddings (HF ties it anyway)."""
    return ["model.layers.{i}.self_attn.rotary_emb.inv_freq"] + (
        ["lm_head.weight"] if cfg.tie_embeddings else [])
