"""The `finetune` config section: its keys, defaults and validation (no JAX, no file system).

`defaults()` of jaxlm.config.schema includes this section in every config; `validate` of
jaxlm.config.validate calls `validate` here. A config whose `finetune.task` is "" is a
pretraining config.
"""

from __future__ import annotations

import ml_collections

from jaxlm.errors import ConfigError

TASKS = ("sft", "dpo", "classify", "qa", "seq2seq")
METHODS = ("full", "lora")
BASE_QUANTS = ("none", "int8", "nf4")  # QLoRA: the frozen base stored quantized
OVERLONG = ("error", "skip")
POOLINGS = ("last", "mean", "first")
LORA_TARGETS = ("q", "k", "v", "o", "mlp")
BUILTIN_TEMPLATES = ("default", "plain")


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # "": pretraining (`jaxlm train`). `jaxlm finetune`: sft (decoder), classify (decoder
        # or encoder), qa (extractive question answering, encoder), seq2seq (text-to-text,
        # encoder-decoder)
        task="",
        method="full",  # full: every parameter trains. lora: low-rank adapters only, base frozen
        # The starting checkpoint: a run directory (`jaxlm train`, `jaxlm convert from-hf`), its
        # checkpoints/ or one step directory. The model's shape comes from its saved config.
        base="",
        train_file="",  # JSONL (see jaxlm/finetune/sft_data.py and classify_data.py)
        eval_file="",  # JSONL held out; "": the last eval_fraction of train_file's examples
        eval_fraction=0.1,
        template="default",  # sft: default | plain | a JSON template file (templates.py)
        packing=True,  # sft: several examples per row (own segment ids); False: one per row
        # An example whose prompt (classify: text) does not fit data.seq_len: "error" (one
        # message naming file:line) or "skip" (counted and reported).
        overlong="error",
        text_field="text",  # classify
        label_field="label",  # classify: an integer in [0, num_labels) or one of label_names
        num_labels=2,  # classify
        label_names="",  # classify: comma-separated names of string labels ("neg,pos")
        # dpo: preference pairs (prompt, chosen, rejected). beta: DPO's inverse temperature
        # (ORPO's weight of the odds-ratio term); orpo: ORPO instead of DPO (no reference)
        dpo_beta=0.1,
        orpo=False,
        # classify: last (last non-padding token) | mean (over real tokens) | first (the
        # first token: an encoder's [CLS])
        pooling="last",
        question_field="question",  # qa (SQuAD-style JSONL)
        context_field="context",  # qa
        # qa: {"text": [...], "answer_start": [...]} (character offsets into the context)
        answers_field="answers",
        max_answer_tokens=30,  # qa: the longest span predicted
        input_field="input",  # seq2seq
        target_field="target",  # seq2seq
        target_len=0,  # seq2seq: decoder tokens per row; 0: data.seq_len
        # QLoRA (method lora): the frozen base held quantized, int8 or nf4 (NormalFloat4),
        # with a scale per group of base_quant_group inputs (0: per output channel); the
        # adapters train in float on the weights the codes stand for
        # (jaxlm/model/quantized.py). none: the base in float32.
        base_quant="none",
        base_quant_group=64,
        lora=ml_collections.ConfigDict(dict(
            rank=8,
            alpha=16.0,  # the adapter's output is scaled by alpha / rank
            dropout=0.0,  # on the adapter's input, training only
            targets="q,k,v,o,mlp",  # attention projections q, k, v, o; mlp: every MLP matrix
        )),
    ))


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.finetune.{key}: {message}")


def lora_targets(lora_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(lora_cfg.targets).split(",") if t.strip())


def lora_scale(lora_cfg: ml_collections.ConfigDict) -> float:
    """The factor of an adapter's term, alpha / rank."""
    return float(lora_cfg.alpha) / int(lora_cfg.rank)


def label_names(ft_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(n.strip() for n in str(ft_cfg.label_names).split(",") if n.strip())


def num_labels(ft_cfg: ml_collections.ConfigDict) -> int:
    names = label_names(ft_cfg)
    return len(names) if names else int(ft_cfg.num_labels)


# Bounds of the section's numeric keys (see jaxlm.config.schema for the others').
MAX_LABELS = 2**20  # a classifier head of num_labels x d_model
MAX_LORA_RANK = 2**16


def validate(ft_cfg: ml_collections.ConfigDict, init_from: str = "") -> None:
    """Raises ConfigError naming the key; nothing is checked for a pretraining config. (The
    numeric keys are range-checked in every config by jaxlm.config.validate, with the
    bounds above.)"""
    if not ft_cfg.task:
        return
    _require(ft_cfg.task in TASKS, "task", f"{ft_cfg.task!r} not in {TASKS} (or '' to pretrain)")
    _require(ft_cfg.method in METHODS, "method", f"{ft_cfg.method!r} not in {METHODS}")
    _require(bool(ft_cfg.base), "base", "a fine-tuning run starts from a checkpoint: set it to "
             "a run directory of `jaxlm train` or `jaxlm convert from-hf`, or a step in it")
    if init_from:
        raise ConfigError("config.checkpoint.init_from: a fine-tuning run starts from "
                          "config.finetune.base; leave init_from empty")
    _require(bool(ft_cfg.train_file), "train_file", "a fine-tuning run needs a JSONL file")
    _require(bool(ft_cfg.eval_file) or 0 < ft_cfg.eval_fraction < 1, "eval_fraction",
             f"must be in (0, 1) when no eval_file is given, got {ft_cfg.eval_fraction!r}")
    _require(ft_cfg.overlong in OVERLONG, "overlong", f"{ft_cfg.overlong!r} not in {OVERLONG}")
    _require(bool(ft_cfg.template), "template",
             f"one of {BUILTIN_TEMPLATES} or the path of a JSON template")
    if ft_cfg.task == "classify":
        names = label_names(ft_cfg)
        _require(len(set(names)) == len(names), "label_names", f"a name appears twice: {names}")
        _require(num_labels(ft_cfg) >= 2, "num_labels" if not names else "label_names",
                 f"a classifier needs at least 2 labels, got {num_labels(ft_cfg)}")
        _require(len(names) <= MAX_LABELS, "label_names",
                 f"{len(names)} names, more than {MAX_LABELS}")
        _require(not names or int(ft_cfg.num_labels) in (2, len(names)), "num_labels",
                 f"{ft_cfg.num_labels} contradicts the {len(names)} label_names")
        _require(ft_cfg.pooling in POOLINGS, "pooling", f"{ft_cfg.pooling!r} not in {POOLINGS}")
        _require(bool(ft_cfg.text_field), "text_field", "must name a JSON field")
        _require(bool(ft_cfg.label_field), "label_field", "must name a JSON field")
    if ft_cfg.task == "dpo":
        _require(isinstance(ft_cfg.orpo, bool), "orpo", f"must be true or false, got "
                 f"{ft_cfg.orpo!r}")
    for task, keys in (("qa", ("question_field", "context_field", "answers_field")),
                       ("seq2seq", ("input_field", "target_field"))):
        if ft_cfg.task == task:
            for key in keys:
                _require(bool(ft_cfg[key]), key, "must name a JSON field")
    _require(ft_cfg.base_quant in BASE_QUANTS, "base_quant",
             f"{ft_cfg.base_quant!r} not in {BASE_QUANTS}")
    _require(ft_cfg.base_quant == "none" or ft_cfg.method == "lora", "base_quant",
             f"{ft_cfg.base_quant!r} quantizes a frozen base: it needs method 'lora' (QLoRA); "
             f"full fine-tuning trains every weight in float")
    lora = ft_cfg.lora
    if ft_cfg.method == "lora":
        targets = lora_targets(lora)
        _require(bool(targets), "lora.targets", f"name at least one of {LORA_TARGETS}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        _require(not unknown, "lora.targets", f"unknown {unknown}; choose from {LORA_TARGETS}")
        _require(len(set(targets)) == len(targets), "lora.targets", "a target appears twice")
