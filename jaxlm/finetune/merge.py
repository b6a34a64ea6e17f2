"""`jaxlm lora merge WORKDIR --out OUT`: a LoRA run's adapters folded into its base.

OUT is a run directory like the ones `jaxlm train` writes: checkpoints/<step> holding
{"step", "params"} (plus "head" for a classifier) with the run's config in its metadata,
and tokenizer/. So `jaxlm generate --workdir OUT`, `jaxlm eval --workdir OUT`,
`--config.checkpoint.init_from=OUT` and `finetune.base=OUT` all read it. Each merged
weight is W + (alpha / r) A^T B computed in float64 and stored as float32.

The base is the exact step directory recorded in the run's config, checked against the
fingerprint recorded when the run started.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import jax
import ml_collections

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import sharding
from jaxlm.checkpoint_tools import CheckpointToolError, locate
from jaxlm.finetune import lora, state as state_lib
from jaxlm.train import optimizer as optimizer_lib


def restore_run(workdir: str | os.PathLike, step: int | None = None
                ) -> tuple[ml_collections.ConfigDict, dict, dict, Any, state_lib.FinetuneSpec]:
    """(config, state, metadata, base params, spec) of a LoRA run's checkpoint, every array
    on one device."""
    from jaxlm.generate import saved_config, single_device_mesh
    location = locate(workdir, step)
    cfg, step_dir = saved_config(location.checkpoints / str(step) if step is not None else workdir)
    if cfg.finetune.method != "lora":
        raise CheckpointToolError(f"{step_dir} is not a LoRA run (finetune.method="
                                  f"{cfg.finetune.method!r}); its checkpoint already holds "
                                  f"the whole model")
    mesh = single_device_mesh()
    tx = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh), sharding.axis_rules():
        fs = state_lib.spec(cfg.model, cfg.finetune, tx, mesh, cfg.train.seed)
    checkpointer = checkpoint_lib.Checkpointer(location.workdir, cfg.checkpoint)
    try:
        state, _, metadata = checkpointer.restore(int(step_dir.name), fs.abstract)
    finally:
        checkpointer.close()
    base = checkpoint_lib.restore_params(cfg.finetune.base, fs.base_abstract)
    from jaxlm.finetune.trainer import fingerprint
    recorded = metadata.get("finetune", {}).get("base_fingerprint")
    if recorded is not None and fingerprint(base) != recorded:
        raise CheckpointToolError(f"base {cfg.finetune.base} changed since the run started "
                                  f"(its fingerprint differs from the one recorded)")
    return cfg, state, metadata, base, fs


def merge_run(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
              log=print) -> pathlib.Path:
    """Writes the merged run directory `out`; returns its step directory."""
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointToolError(f"output exists and is not an empty directory: {out}")
    cfg, state, metadata, base, fs = restore_run(workdir, step)
    saved_step = int(jax.device_get(state["step"]))
    merged = jax.tree.map(jax.numpy.asarray, lora.merge(base, state["adapters"], cfg.finetune.lora))
    tree = {"step": state["step"], "params": merged}
    if "head" in state:
        tree["head"] = state["head"]
    out_meta = checkpoint_lib.run_metadata(cfg, fs.base_axes, metadata.get("tokenizer", ""))
    out_meta["finetune"] = {**metadata.get("finetune", {}), "lora_merged": {
        "workdir": str(locate(workdir).workdir), "step": saved_step}}
    checkpointer = checkpoint_lib.Checkpointer(out, cfg.checkpoint)
    try:
        checkpointer.save(saved_step, tree, {}, out_meta)
        checkpointer.wait()
    finally:
        checkpointer.close()
    tokenizer_dir = locate(workdir).workdir / "tokenizer"
    if tokenizer_dir.is_dir():
        shutil.copytree(tokenizer_dir, out / "tokenizer")
    step_dir = out / "checkpoints" / str(saved_step)
    log(f"merged {len(jax.tree.leaves(state['adapters'])) // 2} adapters (rank "
        f"{cfg.finetune.lora.rank}, alpha {cfg.finetune.lora.alpha}) of step {saved_step} into "
        f"{cfg.finetune.base}; wrote {step_dir}")
    return step_dir
