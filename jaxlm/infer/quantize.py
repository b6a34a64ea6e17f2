"""`jaxlm quantize --workdir RUN --out OUT --weights int8|int4|nf4 [--group-size N]`.

Post-training, weight-only quantization for inference: the run's newest checkpoint (a LoRA
run: its base with the adapters folded in, as generation reads it) is read on the mesh,
each projection, the embedding and the LM head is rounded to codes with scales
(jaxlm/model/quantized.py) under jit, shard by shard, and OUT is written as a new run
directory: checkpoints/<step> holding {"step", "params"} with the run's config, changed
only in model.weights / model.weight_group (and finetune.method "full": the checkpoint
holds the whole model), and a copy of tokenizer/. `jaxlm generate`, `jaxlm eval` and the
scoring API read OUT as any run; training it is refused. RUN is only read.

Group size (`--group-size`): 0 (int8's default) keeps one scale per output channel; int4
and nf4 default to groups of 32 inputs. It must divide d_model, d_ff and head_dim.
"""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint import rundir
from jaxlm.errors import ConfigError
from jaxlm.infer import run_params
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules
from jaxlm.quant import weights as quant_weights

DEFAULT_GROUP = {"int8": 0, "int4": 32, "nf4": 32}


def quantized_config(cfg: ml_collections.ConfigDict, weights: str, group: int | None
                     ) -> ml_collections.ConfigDict:
    """The config of the quantized run; ConfigError naming the key when the run or the
    format does not allow it (checked before any array is read)."""
    if zoo.family(cfg.model.family).kind != "decoder":
        raise ConfigError(f"--weights: quantized runs serve decoder-only families; this run's "
                          f"family {cfg.model.family!r} is "
                          f"{zoo.family(cfg.model.family).kind}")
    if cfg.model.weights != "float":
        raise ConfigError(f"the run's weights are already quantized (model.weights="
                          f"{cfg.model.weights!r}): quantize the float run it came from")
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.model.weights = weights
    out.model.weight_group = DEFAULT_GROUP.get(weights, 0) if group is None else group
    if out.finetune.task:  # the checkpoint holds the whole model (a LoRA run's merged)
        out.finetune.method, out.finetune.base_quant = "full", "none"
    config_lib.validate(out, jax.device_count())
    return out


def quantize_run(workdir: str | os.PathLike, out: str | os.PathLike, weights: str,
                 group: int | None = None, log=print) -> pathlib.Path:
    """Writes the quantized run `out`; returns its step directory."""
    out = rundir.new_output(out)
    cfg, step_dir = rundir.saved_config(workdir)
    cfg = mesh_lib.fit_mesh(cfg)
    # a QLoRA run stands for float weights (its adapters folded into them)
    float_cfg = ml_collections.ConfigDict(cfg.to_dict())
    float_cfg.model = run_params.model_config(cfg, step_dir)
    qcfg = quantized_config(float_cfg, weights, group)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    fmt, size = qcfg.model.weights, qcfg.model.weight_group
    with mesh_lib.use(mesh):
        params = run_params.restore(cfg, step_dir, mesh)
        float_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
        qparams = quant_weights.quantize_placed(params, qcfg.model, mesh)
    _, abstract_q = nnx.split(zoo.abstract(qcfg.model))
    meta = rundir.read_metadata(step_dir)
    step = int(step_dir.name)
    out_meta = checkpoint_lib.run_metadata(qcfg, rules.axes_of(abstract_q),
                                           meta.get("tokenizer", ""))
    source = rundir.locate(workdir).workdir
    out_meta["quantized"] = {"workdir": str(source), "step": step, "weights": fmt,
                             "group": size}
    if meta.get("hf_source"):  # its stop ids (default_stop_ids) come with it
        out_meta["hf_source"] = meta["hf_source"]
    step_dir = checkpoint_lib.write_derived_run(
        out, step, {"step": jax.numpy.asarray(step), "params": qparams}, out_meta,
        qcfg.checkpoint, source)
    stored = sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8
                 for x in jax.tree.leaves(qparams))
    log(f"wrote a quantized run {out} (checkpoint {out / 'checkpoints' / str(step)}): "
        f"{source} step {step}, weights {fmt}"
        + (f" in groups of {size}" if size else " with a scale per output channel")
        + f"; parameter bytes {stored:,} ({stored / float_bytes:.3f}x of float32)\n"
          f"generate, eval and scoring read it; {source} is unchanged")
    return step_dir
