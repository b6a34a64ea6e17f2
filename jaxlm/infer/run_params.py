"""The model parameters a run's checkpoint stands for, for generation and scoring.

A pretraining run or a full fine-tuning run saves its parameters: they are read straight
into their shards. A LoRA run saves adapters only: its parameters are its recorded base's
(`finetune.base`, the exact step directory, checked against the fingerprint recorded when
the run started) with the adapters folded in, in memory, by the same float64 host merge
that `jaxlm lora merge` writes (jaxlm.model.adapters), so generating or scoring from the
LoRA run gives what the merged run gives, bit for bit. Nothing is written anywhere.

A QLoRA run (finetune.base_quant) trained on its base quantized: its base is read and
quantized as the run did (checked against the fingerprint of the quantized base), and the
adapters are folded into the float weights the codes stand for; the run stands for a
float model (`model_config`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxlm.checkpoint import fingerprint, rundir
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.config import finetune as finetune_section
from jaxlm.errors import UserError
from jaxlm.model import adapters as adapters_lib
from jaxlm.model import quantized, zoo
from jaxlm.parallel import rules
from jaxlm.quant import weights as quant_weights

ADAPTERS = "adapters"  # the checkpoint group of a LoRA run's adapters


class LoraBaseError(UserError, ValueError):
    """A LoRA run's base is missing or is not the checkpoint the run was trained on."""


def is_lora(cfg: ml_collections.ConfigDict, step_dir: pathlib.Path) -> bool:
    """Whether the step holds adapters instead of parameters (a LoRA run)."""
    names = checkpoint_lib.saved_arrays(step_dir)
    return not any(n.startswith("params/") for n in names) and \
        any(n.startswith(ADAPTERS + "/") for n in names) and cfg.finetune.method == "lora"


def restore(cfg: ml_collections.ConfigDict, step_dir: pathlib.Path,
            mesh: jax.sharding.Mesh) -> Any:
    """The parameters of `cfg.model` that checkpoint `step_dir` stands for, as a nested dict:
    sharded on `mesh` when read directly, host arrays when a LoRA run's base and adapters
    are merged (the Generator places them)."""
    _, abstract_state = nnx.split(zoo.abstract(cfg.model))
    abstract = rules.abstract_of(abstract_state, mesh)
    if not is_lora(cfg, step_dir):
        return checkpoint_lib.restore_params(step_dir, abstract)
    base = jax.device_get(restore_base(cfg, step_dir, abstract, mesh))
    if cfg.model.weights != "float":  # QLoRA: the weights the codes stand for
        base = quantized.dequantize_tree(base, cfg.model.weights)
    adapters = checkpoint_lib.restore_groups(
        step_dir, {ADAPTERS: abstract_adapters(step_dir, mesh)})[ADAPTERS]
    return adapters_lib.merge(base, jax.device_get(adapters),
                              finetune_section.lora_scale(cfg.finetune.lora))


def model_config(cfg: ml_collections.ConfigDict, step_dir: pathlib.Path
                 ) -> ml_collections.ConfigDict:
    """The model config of the parameters `restore` gives: the run's, but float for a
    QLoRA run (its adapters are folded into float weights)."""
    if cfg.model.weights != "float" and is_lora(cfg, step_dir):
        return quant_weights.float_config(cfg.model)
    return cfg.model


def restore_base(cfg: ml_collections.ConfigDict, step_dir: pathlib.Path, abstract: Any,
                 mesh: jax.sharding.Mesh) -> Any:
    """The LoRA run's base parameters (QLoRA's quantized as the run quantized them),
    checked against the fingerprint the run recorded."""
    base_dir = pathlib.Path(cfg.finetune.base)
    if not base_dir.is_dir():
        raise LoraBaseError(f"{step_dir} is a LoRA run (adapters only) whose base "
                            f"{base_dir} (config.finetune.base) does not exist: restore it "
                            f"there, or generate from a merged copy (`jaxlm lora merge`)")
    base = quant_weights.restore_params(base_dir, cfg.model, abstract, mesh)
    recorded = rundir.read_metadata(step_dir).get("finetune", {}).get("base_fingerprint")
    found = fingerprint.digest(base)
    if found != recorded:  # none recorded: nothing vouches for this base
        raise LoraBaseError(f"base {base_dir} of LoRA run {step_dir} does not match the one "
                            f"the run was trained on (fingerprint {found} != {recorded})")
    return base


def abstract_adapters(step_dir: pathlib.Path, mesh: jax.sharding.Mesh) -> dict:
    """The saved adapters' shapes and dtypes (from the checkpoint's tree metadata; they are
    small), replicated on `mesh`, as the nested dict a restore takes."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out: dict = {}
    for name, meta in checkpoint_lib.saved_arrays(step_dir).items():
        group, *path = name.split("/")
        if group != ADAPTERS:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=replicated)
    return out
