"""The whole config of a run, checked before anything expensive starts: every section
(jaxlm.config), the model family and its own constraints (jaxlm.model) and the TPU slice
named by mesh.topology (jaxlm.parallel.topology). Every command that runs or compiles a
config calls `validate` first; a bad value is one ConfigError naming its key."""

from __future__ import annotations

import ml_collections

from jaxlm import config as config_lib
from jaxlm.data import objectives
from jaxlm.errors import ConfigError
from jaxlm.model import zoo
from jaxlm.parallel import topology

# What each pretraining objective trains: the kind of Transformer (jaxlm.model.zoo.Family).
OBJECTIVE_KINDS = {"causal_lm": "decoder", "masked_lm": "encoder",
                   "span_corruption": "encoder_decoder"}
# Fine-tuning task (config finetune.task) -> the kinds of model it fine-tunes.
FINETUNE_KINDS = {"sft": ("decoder",), "dpo": ("decoder",), "classify": ("decoder", "encoder"),
                  "qa": ("encoder",), "seq2seq": ("encoder_decoder",)}
# train.lm_eval_every: pretraining ("") and the fine-tuning tasks that train a decoder LM.
LM_EVAL_FINETUNE_TASKS = ("", "sft", "dpo")


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    config_lib.validate(cfg, num_devices)
    zoo.validate(cfg.model)
    fam = zoo.family(cfg.model.family)
    if cfg.finetune.task:
        kinds = FINETUNE_KINDS.get(cfg.finetune.task, ())
        if fam.kind not in kinds:
            raise ConfigError(f"config.finetune.task: {cfg.finetune.task!r} fine-tunes "
                              f"{' or '.join(kinds)} models; the base's family {fam.name!r} "
                              f"is {fam.kind}")
    elif OBJECTIVE_KINDS[cfg.objective.name] != fam.kind:
        fitting = [f.name for f in zoo.FAMILIES.values()
                   if f.kind == OBJECTIVE_KINDS[cfg.objective.name]]
        raise ConfigError(f"config.objective.name: {cfg.objective.name!r} trains "
                          f"{OBJECTIVE_KINDS[cfg.objective.name]} models ({', '.join(fitting)}); "
                          f"family {fam.name!r} is {fam.kind}")
    context = config_lib.mesh_shape(cfg.mesh, num_devices)["context"]
    if fam.kind == "encoder_decoder" and context > 1:
        raise ConfigError(f"config.mesh.context: context parallelism is built for the decoder "
                          f"and encoder families; family {fam.name!r} is {fam.kind}")
    if cfg.quant.training != "none" and (cfg.finetune.task or fam.kind == "encoder_decoder"):
        raise ConfigError(f"config.quant.training: {cfg.quant.training!r} quantizes the "
                          f"pretraining of decoder and encoder families (`jaxlm train`); "
                          f"not yet fine-tuning or {fam.kind} family {fam.name!r}")
    if cfg.quant.training != "none" and cfg.model.n_experts:
        raise ConfigError(f"config.quant.training: {cfg.quant.training!r} does not yet "
                          f"quantize the experts of family 'moe' (grouped matmuls)")
    if cfg.model.weights != "float" and fam.kind != "decoder":
        raise ConfigError(f"config.model.weights: {cfg.model.weights!r} weights serve the "
                          f"decoder-only families; family {fam.name!r} is {fam.kind}")
    if not cfg.finetune.task and cfg.objective.name == "span_corruption":
        if cfg.data.packing != "concat":
            raise ConfigError("config.data.packing: span corruption packs examples in order, "
                              "as T5 does; set it to 'concat'")
        objectives.check_span_corruption(cfg.objective, cfg.data.seq_len)
    if cfg.train.lm_eval_every and (fam.kind != "decoder" or cfg.finetune.task
                                    not in LM_EVAL_FINETUNE_TASKS):
        what = f"finetune.task {cfg.finetune.task!r}" if cfg.finetune.task else \
            f"family {fam.name!r} ({fam.kind})"
        raise ConfigError(f"config.train.lm_eval_every: the lm-evaluation-harness scores "
                          f"decoder language models (pretraining, distillation, sft, dpo); "
                          f"this run trains {what}")
    if cfg.mesh.topology:
        try:
            topology.parse(cfg.mesh.topology)
        except topology.TopologyError as e:
            raise ConfigError(f"config.mesh.topology: {e}") from None
