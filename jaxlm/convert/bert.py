"""Hugging Face mapping of the bert family: model_type bert (BertForMaskedLM; also
BertForPreTraining checkpoints such as bert-base-uncased, whose next-sentence head is
ignored) and roberta (RobertaForMaskedLM). Export writes BertForMaskedLM, or
RobertaForMaskedLM for a model whose positions start at a row offset (model.position_offset
> 0), loadable with `transformers.AutoModelForMaskedLM.from_pretrained`.

Config: everything jaxlm would compute differently is refused with the key named: relative
position embeddings, a decoder or cross-attention, untied embeddings, an activation other
than gelu (exact erf), the tanh GELU (gelu_new, gelu_pytorch_tanh, gelu_fast) or relu.
RoBERTa reads position p of a sequence from row pad_token_id + 1 + p
(model.position_offset = pad_token_id + 1); its masked-LM head applies the exact GELU
whatever hidden_act says, so a RoBERTa with another hidden_act is refused.

Tensors: torch Linear weights (out x in, transposed); q, k, v and the attention output
already in jaxlm's head-major order (column h*K + k). The decoder of the masked-LM head
(cls.predictions.decoder.*, lm_head.decoder.*) is tied to the word embeddings and to the
head's bias, as transformers ties it on load: ignored on import, not written on export.
The pooler and the next-sentence head carry no parameter of the masked LM and are ignored;
a checkpoint without the masked-LM head (a bare BertModel, a task model) is refused.
LayerNorm tensors named gamma/beta (old BERT checkpoints) are read as transformers reads
them.
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
    text,
)

MODEL_TYPES = ("bert", "roberta")
AUTO_CLASS = "AutoModelForMaskedLM"  # what loads an export (hf_export.auto_class)
ARCHITECTURES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}
# config.json hidden_act -> model.activation
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu"}
HIDDEN_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}  # export


def _model_type(cfg: ml_collections.ConfigDict) -> str:
    """roberta when positions start at a row offset (its padding_idx + 1), else bert."""
    return "roberta" if cfg.position_offset > 0 else "bert"


def config_from_hf(config: dict, cfg: ml_collections.ConfigDict, where: str,
                   notes: list[str]) -> None:
    """Sets the model config's keys from a bert or roberta config.json (defaults as
    transformers' BertConfig / RobertaConfig; null is an error naming the key, except
    position_embedding_type: null = absolute)."""
    model_type = config["model_type"]
    require(not flag(config, "is_decoder", where, False), where, "is_decoder",
            "=true (a causal BERT decoder) is not supported: jaxlm's bert is an encoder")
    require(not flag(config, "add_cross_attention", where, False), where,
            "add_cross_attention", "=true is not supported")
    kind = text(config, "position_embedding_type", where, "absolute", null="absolute")
    require(kind == "absolute", where, "position_embedding_type",
            f"={kind!r} is not supported (jaxlm's bert has absolute position embeddings)")
    cfg.d_model = integer(config, "hidden_size", where)
    cfg.n_layers = integer(config, "num_hidden_layers", where)
    cfg.n_heads = cfg.n_kv_heads = integer(config, "num_attention_heads", where)
    require(cfg.d_model % cfg.n_heads == 0, where, "hidden_size",
            f"={cfg.d_model} is not divisible by num_attention_heads={cfg.n_heads}")
    cfg.head_dim = cfg.d_model // cfg.n_heads
    cfg.d_ff = integer(config, "intermediate_size", where)
    cfg.max_seq_len = integer(config, "max_position_embeddings", where, 512)
    cfg.type_vocab_size = integer(config, "type_vocab_size", where, 2)
    cfg.norm_eps = number(config, "layer_norm_eps", where, 1e-12)
    cfg.init_std = number(config, "initializer_range", where, 0.02)
    cfg.tie_embeddings = flag(config, "tie_word_embeddings", where, True)
    require(cfg.tie_embeddings, where, "tie_word_embeddings",
            "=false is not supported (jaxlm's masked-LM head reads the word embeddings)")
    act = text(config, "hidden_act", where, "gelu")
    require(act in ACTIVATIONS, where, "hidden_act",
            f"={act!r} is not supported (jaxlm's bert has {', '.join(ACTIVATIONS)})")
    cfg.activation = ACTIVATIONS[act]
    if model_type == "roberta":
        require(act == "gelu", where, "hidden_act",
                f"={act!r} is not supported for roberta: its masked-LM head applies the exact "
                f"GELU whatever hidden_act says, jaxlm's head the MLP's activation")
        pad = integer(config, "pad_token_id", where, 1, minimum=0)
        require(pad + 1 < cfg.max_seq_len, where, "pad_token_id",
                f"={pad}: RoBERTa's positions start at row pad_token_id + 1, beyond the "
                f"max_position_embeddings={cfg.max_seq_len} rows")
        cfg.position_offset = pad + 1
        notes.append(f"roberta: position p reads row p + {pad + 1} (pad_token_id + 1) of the "
                     f"position table: sequences up to {cfg.max_seq_len - pad - 1} tokens")


def _refuse_unless(ok: bool, key: str, message: str) -> None:
    """An export this model cannot be: HFConfigError naming the jaxlm config key."""
    if not ok:
        raise HFConfigError(f"config.model.{key}{message}")


def _check_exportable(m: ml_collections.ConfigDict) -> None:
    d, h, _, k, _, _ = dims(m)
    _refuse_unless(h * k == d, "head_dim", f"={k}: Hugging Face BERT has head_dim = "
                   f"hidden_size / num_attention_heads ({d} / {h})")
    _refuse_unless(_model_type(m) == "bert" or m.activation == "gelu", "activation",
                   f"={m.activation!r} with position_offset={m.position_offset} (RoBERTa) "
                   f"is not exportable: RobertaForMaskedLM's head always applies the exact "
                   f"gelu")


def config_to_hf(m: ml_collections.ConfigDict, base: dict[str, Any]) -> dict[str, Any]:
    """config.json of BertForMaskedLM, or of RobertaForMaskedLM when model.position_offset
    > 0: its pad_token_id is position_offset - 1, which must be the tokenizer's pad id
    (RoBERTa counts positions over the tokens that are not that id)."""
    _check_exportable(m)
    model_type = _model_type(m)
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, **base,
           "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
           "num_attention_heads": m.n_heads, "intermediate_size": m.d_ff,
           "max_position_embeddings": m.max_seq_len, "type_vocab_size": m.type_vocab_size,
           "layer_norm_eps": m.norm_eps, "hidden_act": HIDDEN_ACT[m.activation],
           "initializer_range": m.init_std, "position_embedding_type": "absolute",
           "is_decoder": False, "add_cross_attention": False, "hidden_dropout_prob": 0.0,
           "attention_probs_dropout_prob": 0.0}
    if model_type == "roberta":
        pad = m.position_offset - 1
        _refuse_unless(base.get("pad_token_id") == pad, "position_offset",
                       f"={m.position_offset}: RobertaForMaskedLM reads position p from row "
                       f"pad_token_id + 1 + p, so the tokenizer's pad id must be {pad}; it "
                       f"is {base.get('pad_token_id')}")
    return out


def _prefix(cfg: ml_collections.ConfigDict) -> str:
    return f"{_model_type(cfg)}."


def _head(cfg: ml_collections.ConfigDict) -> str:
    return "cls.predictions." if _model_type(cfg) == "bert" else "lm_head."


def _norm(tensor_names: Any) -> tuple[str, str]:
    """The LayerNorm tensors' (scale, bias) names: weight/bias, or gamma/beta in old BERT
    checkpoints (transformers renames them on load)."""
    old = tensor_names is not None and any(n.endswith("LayerNorm.gamma") for n in tensor_names)
    return ("gamma", "beta") if old else ("weight", "bias")


def rules(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[Rule]:
    """Every tensor of the checkpoint, in the order Hugging Face writes them. A checkpoint
    (`tensor_names`) without the masked-LM head is refused here, before anything is read."""
    prefix, head = _prefix(cfg), _head(cfg)
    t = head + ("transform." if _model_type(cfg) == "bert" else "")  # the head's transform
    if tensor_names is None:
        _check_exportable(cfg)
    elif t + "dense.weight" not in tensor_names:
        bare = "embeddings.word_embeddings.weight" in tensor_names
        raise HFConfigError(
            f"the checkpoint has no masked-LM head ({t}dense.weight is missing"
            + (f"; its tensors lack the '{prefix}' prefix: a bare "
               f"{ARCHITECTURES[_model_type(cfg)].replace('ForMaskedLM', 'Model')}" if bare
               else "") + f"): jaxlm imports {ARCHITECTURES[_model_type(cfg)]} checkpoints"
            + (" (or BertForPreTraining)" if _model_type(cfg) == "bert" else ""))
    d, h, _, k, f, v = dims(cfg)
    scale, bias = _norm(tensor_names)
    e = prefix + "embeddings."
    p = prefix + "encoder.layer.{i}."
    out = [
        Rule(e + "word_embeddings.weight", (v, d), ("embed",)),
        Rule(e + "position_embeddings.weight", (cfg.max_seq_len, d), ("pos_embed",)),
        Rule(e + "token_type_embeddings.weight", (cfg.type_vocab_size, d), ("type_embed",)),
        Rule(e + f"LayerNorm.{scale}", (d,), ("embed_norm/scale",)),
        Rule(e + f"LayerNorm.{bias}", (d,), ("embed_norm/bias",)),
    ]
    for name, w in (("query", "q"), ("key", "k"), ("value", "v")):
        out += [Rule(p + f"attention.self.{name}.weight", (h * k, d), (f"blocks/attn/w{w}",),
                     transpose=True),
                Rule(p + f"attention.self.{name}.bias", (h * k,), (f"blocks/attn/b{w}",))]
    out += [
        Rule(p + "attention.output.dense.weight", (d, h * k), ("blocks/attn/wo",), transpose=True),
        Rule(p + "attention.output.dense.bias", (d,), ("blocks/attn/bo",)),
        Rule(p + f"attention.output.LayerNorm.{scale}", (d,), ("blocks/attn_norm/scale",)),
        Rule(p + f"attention.output.LayerNorm.{bias}", (d,), ("blocks/attn_norm/bias",)),
        Rule(p + "intermediate.dense.weight", (f, d), ("blocks/mlp/w_in",), transpose=True),
        Rule(p + "intermediate.dense.bias", (f,), ("blocks/mlp/b_in",)),
        Rule(p + "output.dense.weight", (d, f), ("blocks/mlp/w_out",), transpose=True),
        Rule(p + "output.dense.bias", (d,), ("blocks/mlp/b_out",)),
        Rule(p + f"output.LayerNorm.{scale}", (d,), ("blocks/mlp_norm/scale",)),
        Rule(p + f"output.LayerNorm.{bias}", (d,), ("blocks/mlp_norm/bias",)),
    ]
    norm = (f"LayerNorm.{scale}", f"LayerNorm.{bias}") if _model_type(cfg) == "bert" else (
        "layer_norm.weight", "layer_norm.bias")
    out += [Rule(t + "dense.weight", (d, d), ("head_dense",), transpose=True),
            Rule(t + "dense.bias", (d,), ("head_bias",)),
            Rule(t + norm[0], (d,), ("head_norm/scale",)),
            Rule(t + norm[1], (d,), ("head_norm/bias",)),
            Rule(head + "bias", (v,), ("out_bias",))]
    return out


def ignorable(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[str]:
    """Tensors a checkpoint may hold that carry no parameter: the head's decoder (tied to
    the word embeddings and the head's bias), the pooler, BertForPreTraining's
    next-sentence head, and the position-id buffer older versions saved."""
    prefix, head = _prefix(cfg), _head(cfg)
    names = [head + "decoder.weight", head + "decoder.bias", prefix + "pooler.dense.weight",
             prefix + "pooler.dense.bias", prefix + "embeddings.position_ids"]
    if _model_type(cfg) == "bert":
        names += ["cls.seq_relationship.weight", "cls.seq_relationship.bias"]
    return names
