"""Hugging Face mapping of the t5 family: model_type t5 (T5 v1.0, v1.1, Flan-T5) and mt5,
T5ForConditionalGeneration / MT5ForConditionalGeneration. Export writes model_type t5
(T5ForConditionalGeneration), loadable with `transformers.AutoModelForSeq2SeqLM`.

Config: num_decoder_layers null or absent means num_layers; d_kv is the head size (H x d_kv
may differ from d_model); relative_attention_max_distance absent (old configs) is 128.
feed_forward_proj "ACT" (plain MLP) or "gated-ACT" (act(x wi_0) * (x wi_1)), as transformers
reads it: "gated-gelu" is the tanh GELU (gelu_new) for backward compatibility, plain "gelu"
the exact one; activations jaxlm lacks (silu, ...) are refused naming the key, and so are
dense_act_fn / is_gated_act (written by transformers 5) that disagree with it.
decoder_start_token_id (T5: the pad id 0) is recorded in the run's notes and metadata; the
generation code is given it.

The head, as transformers 5 computes the logits: model_type t5 rescales the decoder output
by d_model**-0.5 when scale_decoder_outputs (present in configs written by transformers 5)
or, absent, tie_word_embeddings (default true) says so: that is jaxlm's tied head
(model.tie_embeddings true; an lm_head.weight saved beside it is ignored, as transformers 4
ties it). Without the rescaling (v1.1, Flan-T5; mt5 always) the head is untied: its
lm_head.weight, or, when the checkpoint has none (a v1.1 model saved by transformers 5,
whose head is the shared embedding), a copy of shared.weight. Export writes
tie_word_embeddings false and lm_head.weight for an untied head, which transformers 4 and 5
both read as untied and unscaled.

Tensors: torch Linear weights (out x in, transposed); q, k, v columns and o rows in
head-major order (h*K + k, jaxlm's (h, k)); the relative-position bias (buckets x heads)
lives in layer 0 of each stack and is every layer's; encoder/decoder embed_tokens are tied
copies of shared.weight (ignored).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxlm.convert.spec import Rule, dims, flag, integer, number, require, text
from jaxlm.model.zoo import decoder_layers

MODEL_TYPES = ("t5", "mt5")
ARCHITECTURE = "T5ForConditionalGeneration"
AUTO_CLASS = "AutoModelForSeq2SeqLM"  # what loads an export (jaxlm.convert.hf_export.auto_class)
# transformers activation name (ACT2FN) -> model.activation
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
FF_ACT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}  # export: model.activation ->


def _feed_forward(config: dict, where: str) -> tuple[str, bool]:
    """(transformers activation name, gated) of feed_forward_proj, as T5Config derives them;
    dense_act_fn and is_gated_act, when present, must agree."""
    default = "gated-gelu" if config["model_type"] == "mt5" else "relu"
    proj = text(config, "feed_forward_proj", where, default)
    parts = proj.split("-")
    require(len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated"), where,
            "feed_forward_proj", f"={proj!r} is not 'ACT' or 'gated-ACT'")
    gated, act = parts[0] == "gated" and len(parts) == 2, parts[-1]
    act = "gelu_new" if proj == "gated-gelu" else act
    require(act in ACTIVATIONS, where, "feed_forward_proj",
            f"={proj!r} is not supported (jaxlm's T5 MLP activations: "
            f"{', '.join(ACTIVATIONS)}, plain or gated)")
    written = text(config, "dense_act_fn", where, act)
    require(written == act, where, "dense_act_fn",
            f"={written!r} disagrees with feed_forward_proj={proj!r} ({act!r})")
    require(flag(config, "is_gated_act", where, gated) == gated, where, "is_gated_act",
            f"disagrees with feed_forward_proj={proj!r}")
    return act, gated


def _rescaled(config: dict, where: str) -> bool:
    """Whether transformers multiplies the decoder output by d_model**-0.5 (module docstring)."""
    tied = flag(config, "tie_word_embeddings", where, True)
    if config["model_type"] == "mt5":
        return False
    return flag(config, "scale_decoder_outputs", where, tied)


def config_from_hf(config: dict, cfg: ml_collections.ConfigDict, where: str,
                   notes: list[str]) -> None:
    """Sets the model config's keys from a t5 or mt5 config.json (defaults as transformers'
    T5Config / MT5Config; null is an error naming the key, except num_decoder_layers: null
    = num_layers)."""
    require(flag(config, "is_encoder_decoder", where, True), where, "is_encoder_decoder",
            "=false is not supported (jaxlm's t5 is the encoder-decoder)")
    cfg.d_model = integer(config, "d_model", where)
    cfg.n_layers = integer(config, "num_layers", where)
    cfg.n_decoder_layers = integer(config, "num_decoder_layers", where, cfg.n_layers,
                                   null=cfg.n_layers)
    cfg.n_heads = cfg.n_kv_heads = integer(config, "num_heads", where)
    cfg.head_dim = integer(config, "d_kv", where)
    cfg.d_ff = integer(config, "d_ff", where)
    cfg.relative_buckets = integer(config, "relative_attention_num_buckets", where, 32)
    require(cfg.relative_buckets >= 4, where, "relative_attention_num_buckets",
            f"={cfg.relative_buckets} is below 4 (transformers divides by zero)")
    cfg.relative_max_distance = integer(config, "relative_attention_max_distance", where, 128)
    require(cfg.relative_max_distance > cfg.relative_buckets // 2, where,
            "relative_attention_max_distance",
            f"={cfg.relative_max_distance} must exceed relative_attention_num_buckets // 2 "
            f"= {cfg.relative_buckets // 2}")
    cfg.norm_eps = number(config, "layer_norm_epsilon", where, 1e-6)
    # Relative positions have no length limit; n_positions (old configs) bounds the runs'
    # data.seq_len and the exported tokenizer's model_max_length.
    cfg.max_seq_len = integer(config, "n_positions", where, 512, null=512)
    act, cfg.gated_mlp = _feed_forward(config, where)
    cfg.activation = ACTIVATIONS[act]
    cfg.tie_embeddings = _rescaled(config, where)
    start = config.get("decoder_start_token_id")
    notes.append(f"decoder_start_token_id={start}: generation starts the decoder from this id"
                 if start is not None else
                 "config.json has no decoder_start_token_id: T5 starts the decoder from the "
                 "pad id (0)")


def config_to_hf(m: ml_collections.ConfigDict, base: dict[str, Any]) -> dict[str, Any]:
    """config.json of T5ForConditionalGeneration (tie_word_embeddings from `base`: true is
    the rescaled tied head, false the untied head without rescaling, in transformers 4
    and 5)."""
    pad = base.get("pad_token_id")
    return {"architectures": [ARCHITECTURE], "model_type": "t5", **base,
            "d_model": m.d_model, "num_layers": m.n_layers,
            "num_decoder_layers": decoder_layers(m), "num_heads": m.n_heads,
            "d_kv": dims(m)[3], "d_ff": m.d_ff,
            "relative_attention_num_buckets": m.relative_buckets,
            "relative_attention_max_distance": m.relative_max_distance,
            "layer_norm_epsilon": m.norm_eps,
            "feed_forward_proj": ("gated-" if m.gated_mlp else "") + FF_ACT[m.activation],
            "is_encoder_decoder": True, "decoder_start_token_id": 0 if pad is None else pad,
            "n_positions": m.max_seq_len, "dropout_rate": 0.0, "initializer_factor": 1.0}


def _attention(prefix: str, module: str, params: str, d: int, h: int, k: int) -> list[Rule]:
    return [Rule(f"{prefix}{module}.{name}.weight", (h * k, d), (f"{params}/w{name}",),
                 transpose=True) for name in ("q", "k", "v")] + [
        Rule(f"{prefix}{module}.o.weight", (d, h * k), (f"{params}/wo",), transpose=True)]


def _mlp(prefix: str, stack: str, cfg: ml_collections.ConfigDict) -> list[Rule]:
    d, f = cfg.d_model, cfg.d_ff
    p = f"{prefix}DenseReluDense."
    if cfg.gated_mlp:
        names = (("wi_0", "w_gate", (f, d)), ("wi_1", "w_up", (f, d)), ("wo", "w_down", (d, f)))
    else:
        names = (("wi", "w_in", (f, d)), ("wo", "w_out", (d, f)))
    return [Rule(f"{p}{hf}.weight", shape, (f"{stack}/mlp/{ours}",), transpose=True)
            for hf, ours, shape in names]


def rules(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[Rule]:
    """Every tensor of the checkpoint; `tensor_names` (import) tells whether an untied head
    is saved as lm_head.weight or only as the shared embedding."""
    d, h, _, k, _, v = dims(cfg)
    out = [Rule("shared.weight", (v, d), ("embed",))]
    for side, stack, layer_names in (
            ("encoder", "encoder_blocks", ("layer.0", None, "layer.1")),
            ("decoder", "decoder_blocks", ("layer.0", "layer.1", "layer.2"))):
        p = f"{side}.block.{{i}}."
        attn, cross, mlp = layer_names
        out += [Rule(f"{p}{attn}.layer_norm.weight", (d,), (f"{stack}/attn_norm/scale",))]
        out += _attention(f"{p}{attn}.", "SelfAttention", f"{stack}/attn", d, h, k)
        out += [Rule(f"{side}.block.0.{attn}.SelfAttention.relative_attention_bias.weight",
                     (cfg.relative_buckets, h), (f"{side}_rel_bias",))]
        if cross is not None:
            out += [Rule(f"{p}{cross}.layer_norm.weight", (d,), (f"{stack}/cross_norm/scale",))]
            out += _attention(f"{p}{cross}.", "EncDecAttention", f"{stack}/cross_attn", d, h, k)
        out += [Rule(f"{p}{mlp}.layer_norm.weight", (d,), (f"{stack}/mlp_norm/scale",))]
        out += _mlp(f"{p}{mlp}.", stack, cfg)
        out += [Rule(f"{side}.final_layer_norm.weight", (d,), (f"{side}_norm/scale",))]
    if not cfg.tie_embeddings:
        saved = tensor_names is None or "lm_head.weight" in tensor_names
        out.append(Rule("lm_head.weight", (v, d), ("lm_head",), transpose=True,
                        source="" if saved else "shared.weight"))
    return out


def ignorable(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[str]:
    """Tensors a checkpoint may hold that carry no parameter: the stacks' tied copies of the
    shared embedding, a cross-attention position bias some old checkpoints carry (unused,
    as transformers ignores it), and an lm_head saved beside a tied (rescaled) head."""
    return ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] + (
        ["lm_head.weight"] if cfg.tie_embeddings else [])

