"""The jaxlm parameter tree of a model config, flat ("blocks/attn/wq") and nested, and a
converted run directory: an Orbax checkpoint of the parameters that `jaxlm checkpoint`,
`checkpoint.init_from` and `checkpoint.restore_params` read like any run's.

Writing keeps memory near one copy of the parameters: the arrays are handed to Orbax as
NumPy arrays without its defensive copy, fingerprints are computed one array at a time, and
OCDBT data files are kept small so TensorStore does not buffer the whole checkpoint.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import fingerprint as fingerprint_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint.rundir import quiet_orbax
from jaxlm.model import zoo
from jaxlm.parallel import rules
from jaxlm.train.validate import OBJECTIVE_KINDS, validate

CONFIG_FILE = "config.py"
STEP = 0


def abstract_params(model_cfg: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict]:
    """({path: ShapeDtypeStruct} of every parameter, nested logical axes) without allocating."""
    _, state = nnx.split(zoo.abstract(model_cfg))
    return flatten(nnx.to_pure_dict(state)), rules.axes_of(state)


def stack_depths(model_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Each layer stack of the model (a top-level module whose parameters lead with the
    "layers" axis: "blocks"; t5's "encoder_blocks", "decoder_blocks") -> its layer count,
    read off the parameter tree (what spec.expand takes)."""
    shapes, axes = abstract_params(model_cfg)
    return {name.split("/")[0]: shapes[name].shape[0]
            for name, names in flatten(axes).items() if names and names[0] == "layers"}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def run_config(model_cfg: ml_collections.ConfigDict, workdir: pathlib.Path,
               tokenizer_name: str) -> ml_collections.ConfigDict:
    """A full, validated jaxlm config for the model: its tokenizer is the run's, a run
    started from it takes its parameters from `workdir` (checkpoint.init_from) and trains the
    family's pretraining objective (train.validate.OBJECTIVE_KINDS)."""
    cfg = config_lib.defaults()
    cfg.model = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.data.tokenizer = tokenizer_name
    cfg.data.tokenizer_path = str(workdir / "tokenizer")
    # the positions a row may use (RoBERTa's table starts at row position_offset)
    cfg.data.seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len - model_cfg.position_offset)
    cfg.checkpoint.init_from = str(workdir)
    # the pretraining objective that fits the family (bert: masked_lm, t5: span_corruption)
    kind = zoo.family(model_cfg.family).kind
    cfg.objective.name = next(name for name, k in OBJECTIVE_KINDS.items() if k == kind)
    validate(cfg, num_devices=1)
    return cfg


# The config file of a converted run: fixed code, the same for every run, that reads the
# run's values (model, tokenizer, where the parameters are) as data from VALUES_FILE beside
# it. No path, name or other string of the user's is ever part of Python source, so no
# directory name can inject code; loading it parses JSON and runs nothing else.
CONFIG_TEXT = '''"""A model converted from Hugging Face by `jaxlm convert from-hf`: a config
whose runs start from the parameters of this directory (checkpoint.init_from), with its model
and tokenizer. The values are data in config_values.json beside this file; this file holds
none.

Fine-tune (parameters from this directory, fresh optimizer):
    jaxlm train --config THIS_DIRECTORY/config.py --workdir runs/finetune --config.data.dataset=...
"""

import json
import pathlib

import ml_collections

from jaxlm import config as config_lib

VALUES = pathlib.Path(__file__).with_name("config_values.json")


def get_config() -> ml_collections.ConfigDict:
    try:
        values = json.loads(VALUES.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(f"{VALUES}: cannot read the converted run's values "
                                     f"({e})") from None
    if not isinstance(values, dict):
        raise config_lib.ConfigError(f"{VALUES}: not a JSON object")
    cfg = config_lib.defaults()
    config_lib.merge_overrides(cfg, ml_collections.ConfigDict(values))
    return cfg
'''
VALUES_FILE = "config_values.json"


def config_values(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the converted run's config sets over the defaults (VALUES_FILE's content)."""
    defaults = config_lib.defaults()
    values = {"model": cfg.model.to_dict(),
              "data": {k: cfg.data[k] for k in ("tokenizer", "tokenizer_path", "seq_len")
                       if cfg.data[k] != defaults.data[k]},
              "checkpoint": {"init_from": cfg.checkpoint.init_from}}
    if cfg.objective.name != defaults.objective.name:
        values["objective"] = {"name": cfg.objective.name}
    return values


def write_config_file(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> None:
    """`workdir/config.py` (CONFIG_TEXT, fixed) and `workdir/config_values.json` (the
    overrides of `run_config`, as JSON: paths with quotes, backslashes or newlines are
    plain strings there). The values are written first, so a config.py is never without
    them."""
    text = json.dumps(config_values(cfg), indent=2, sort_keys=True, allow_nan=False) + "\n"
    (workdir / VALUES_FILE).write_text(text, encoding="utf-8")
    (workdir / CONFIG_FILE).write_text(CONFIG_TEXT, encoding="utf-8")


def _ocdbt_file_bytes(total: int) -> int:
    # TensorStore holds an OCDBT data file in memory until it is written: small files keep
    # the save's extra memory a small fraction of the checkpoint (measured by the bench).
    return int(min(max(total // 256, 2**20), 64 * 2**20))


def fingerprint(name: str, value: np.ndarray) -> dict[str, int]:
    """The checksum entry jaxlm keeps for parameter `name` ({"params/<name>": hash}), the
    checkpoint's own fingerprint (jaxlm.checkpoint.fingerprint) computed on the host a
    chunk at a time: a device copy of each array would set the conversion's peak memory."""
    value = fingerprint_lib.numpy_fingerprint(value)
    return {} if value is None else {f"params/{name}": value}


def write_checkpoint(workdir: pathlib.Path, cfg: ml_collections.ConfigDict,
                     flat_params: dict[str, np.ndarray], param_axes: dict, tokenizer_name: str,
                     extra_metadata: dict[str, Any] | None = None,
                     checksums: dict[str, int] | None = None) -> pathlib.Path:
    """Saves `flat_params` (float32 NumPy) as step 0 of `workdir/checkpoints` with the items
    every jaxlm checkpoint has: state {"params"}, data, metadata (run_metadata) and
    checksums (computed here unless given). Returns the step directory."""

    metadata = checkpoint_lib.run_metadata(cfg, param_axes, tokenizer_name)
    metadata.update(extra_metadata or {})
    sums = dict(checksums) if checksums is not None else {}
    if checksums is None:
        for name, value in flat_params.items():
            sums.update(fingerprint(name, value))
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    total = sum(v.nbytes for v in flat_params.values())
    with quiet_orbax():
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
        handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                    "data": ocp.JsonCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler(),
                    "checksums": ocp.JsonCheckpointHandler()}
        manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options,
                                        item_handlers=handlers)
        try:
            manager.save(STEP, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave({"params": unflatten(flat_params)},
                                          ocdbt_target_data_file_size=_ocdbt_file_bytes(total)),
                data=ocp.args.JsonSave({}), metadata=ocp.args.JsonSave(metadata),
                checksums=ocp.args.JsonSave(sums)))
            manager.wait_until_finished()
        finally:
            manager.close()
    return workdir.absolute() / "checkpoints" / str(STEP)
