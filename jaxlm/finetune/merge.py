"""`jaxlm lora merge WORKDIR --out OUT`: a LoRA run's adapters folded into its base.

OUT is a run directory like the ones `jaxlm train` writes: checkpoints/<step> holding
{"step", "params"} (plus "head" for a classifier) with the run's config in its metadata
(finetune.method "full": the checkpoint holds the whole model), and tokenizer/. The LoRA run
and its base are only read. So `jaxlm generate --workdir OUT`, `jaxlm eval --workdir OUT`,
`--config.checkpoint.init_from=OUT` and `finetune.base=OUT` all read it (generate, eval and
classify read the LoRA run itself too: merging is for export and for a new base). Each merged
weight is W + (alpha / r) A^T B computed in float64 and stored as float32.

The base is the exact step directory recorded in the run's config, checked against the
fingerprint recorded when the run started.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint import rundir
from jaxlm.finetune import lora
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.model import quantized, zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules
from jaxlm.quant import weights as quant_weights


def restore_run(workdir: str | os.PathLike, step: int | None = None
                ) -> tuple[FinetuneTask, dict, dict[str, Any]]:
    """(the run's task with its frozen base loaded and checked, its state, its metadata) of
    a LoRA run's checkpoint, every array on one device."""
    location = rundir.locate(workdir, step)
    cfg, step_dir = rundir.saved_config(workdir, step)
    if cfg.finetune.method != "lora":
        raise rundir.RunDirError(f"{step_dir} is not a LoRA run (finetune.method="
                                 f"{cfg.finetune.method!r}); its checkpoint already holds the "
                                 f"whole model")
    cfg.mesh = config_lib.defaults().mesh  # one device, whatever mesh the run had
    task = FinetuneTask(cfg, location.workdir, num_devices=1)
    mesh = mesh_lib.single_device_mesh()
    with mesh_lib.use(mesh):
        task.build(mesh)
    checkpointer = checkpoint_lib.Checkpointer(location.workdir, cfg.checkpoint)
    try:
        state, _, metadata = checkpointer.restore(int(step_dir.name), task.spec.abstract)
    finally:
        checkpointer.close()
    return task, task.resume(state, metadata), metadata


def merge_run(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
              log=print) -> pathlib.Path:
    """Writes the merged run directory `out`; returns its step directory."""
    out = rundir.new_output(out)
    task, state, metadata = restore_run(workdir, step)
    cfg = task.cfg
    saved_step = int(jax.device_get(state["step"]))
    base = jax.device_get(task.frozen["params"])
    if cfg.model.weights != "float":  # QLoRA: the float weights the base's codes stand for
        base = quantized.dequantize_tree(base, cfg.model.weights)
    merged = jax.tree.map(jax.numpy.asarray, lora.merge(base, state["adapters"], cfg.finetune.lora))
    tree = {"step": state["step"], "params": merged}
    if "head" in state:
        tree["head"] = state["head"]
    source = rundir.locate(workdir).workdir
    out_cfg = merged_config(cfg)
    axes = rules.axes_of(nnx.split(zoo.abstract(out_cfg.model))[1])  # the float model's
    out_meta = checkpoint_lib.run_metadata(out_cfg, axes, metadata.get("tokenizer", ""))
    out_meta["finetune"] = {**metadata.get("finetune", {}), "method": "full",
                            "groups": sorted(set(tree) - {"step"}),
                            "lora_merged": {"workdir": str(source), "step": saved_step}}
    step_dir = checkpoint_lib.write_derived_run(out, saved_step, tree, out_meta, cfg.checkpoint,
                                                source)
    log(f"wrote a new run {out} (checkpoint {step_dir}): base {cfg.finetune.base} with the "
        f"{len(jax.tree.leaves(state['adapters'])) // 2} adapters (rank "
        f"{cfg.finetune.lora.rank}, alpha {cfg.finetune.lora.alpha}) of {source} step "
        f"{saved_step} folded in\nthe LoRA run and its base are unchanged (generate, eval and "
        f"classify also read the LoRA run directly)")
    return step_dir


def merged_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config saved with the merged run: the LoRA run's, with finetune.method "full"
    (its checkpoint holds the whole model, as a full fine-tuning run's does), so that
    `jaxlm eval` restores its parameters instead of looking for adapters; a QLoRA run's
    with float weights."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.finetune.method, out.finetune.base_quant = "full", "none"
    out.model = quant_weights.float_config(cfg.model)  # QLoRA's merge is a float model
    return out
