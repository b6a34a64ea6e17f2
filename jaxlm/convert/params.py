"""The jaxlm parameter tree of a model config, flat ("blocks/attn/wq") and nested, and a
converted run directory: an Orbax checkpoint of the parameters that `jaxlm checkpoint`,
`checkpoint.init_from` and `checkpoint.restore_params` read like any run's.

Writing keeps memory near one copy of the parameters: the arrays are handed to Orbax as
NumPy arrays without its defensive copy, fingerprints are computed one array at a time, and
OCDBT data files are kept small so TensorStore does not buffer the whole checkpoint.
"""

from __future__ import annotations

import pathlib
import pprint
from typing import Any

import ml_collections
import numpy as np

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib

CONFIG_FILE = "config.py"
STEP = 0


def abstract_params(model_cfg: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict]:
    """({path: ShapeDtypeStruct} of every parameter, nested logical axes) without allocating."""
    import jax
    from flax import nnx

    from jaxlm import sharding
    from jaxlm.model import transformer

    model = nnx.eval_shape(lambda: transformer.create(model_cfg))
    _, state = nnx.split(model)
    axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(sharding.variable_axes(v)), state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return flatten(nnx.to_pure_dict(state)), axes


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
    """A full, validated jaxlm config for the model: its tokenizer is the run's, and a run
    started from it takes its parameters from `workdir` (checkpoint.init_from)."""
    cfg = config_lib.defaults()
    cfg.model = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.data.tokenizer = tokenizer_name
    cfg.data.tokenizer_path = str(workdir / "tokenizer")
    cfg.data.seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len)
    cfg.checkpoint.init_from = str(workdir)
    config_lib.validate(cfg, num_devices=1)
    return cfg


def write_config_file(workdir: pathlib.Path, cfg: ml_collections.ConfigDict, title: str) -> None:
    """`workdir/config.py`: the overrides of `run_config` as a jaxlm config file."""
    defaults = config_lib.defaults()
    overrides = {"model": cfg.model.to_dict(),
                 "data": {k: cfg.data[k] for k in ("tokenizer", "tokenizer_path", "seq_len")
                          if cfg.data[k] != defaults.data[k]},
                 "checkpoint": {"init_from": cfg.checkpoint.init_from}}
    text = (f'"""{title}\n\nFine-tune (parameters from this directory, fresh optimizer):\n'
            f'    jaxlm train --config {workdir / CONFIG_FILE} --workdir runs/finetune '
            f'--config.data.dataset=...\n"""\n\n'
            "import ml_collections\n\nfrom jaxlm import config as config_lib\n\n"
            f"OVERRIDES = {pprint.pformat(overrides, width=96, sort_dicts=True)}\n\n\n"
            "def get_config() -> ml_collections.ConfigDict:\n"
            "    cfg = config_lib.defaults()\n"
            "    config_lib.merge_overrides(cfg, ml_collections.ConfigDict(OVERRIDES))\n"
            "    return cfg\n")
    (workdir / CONFIG_FILE).write_text(text)


def _ocdbt_file_bytes(total: int) -> int:
    # TensorStore holds an OCDBT data file in memory until it is written: small files keep
    # the save's extra memory a small fraction of the checkpoint (measured by the bench).
    return int(min(max(total // 256, 2**20), 64 * 2**20))


_FINGERPRINT_CHUNK = 1 << 20  # elements per step: a few MB of temporaries


def fingerprint(name: str, value: np.ndarray) -> dict[str, int]:
    """The checksum entry jaxlm keeps for parameter `name` ({"params/<name>": hash}), equal
    to `checkpoint.checksums`' (restores compare the two; a test pins the equality) but
    computed in NumPy a chunk at a time: the JAX version copies the whole array to the
    device and holds temporaries about twice its size, which would set the conversion's
    peak memory. The hash: sum over elements of h ^ (h >> 13), h = (bits ^ (i * 0x9E3779B9))
    * 0x85EBCA6B, with i the row-major index, all modulo 2**32."""
    if value.dtype.itemsize not in (1, 2, 4):
        return {}  # checkpoint.checksums skips 8-byte dtypes too
    flat = np.ascontiguousarray(value).reshape(-1)
    bits = flat if flat.dtype == np.bool_ else flat.view(f"u{flat.dtype.itemsize}")
    total = 0
    for start in range(0, flat.size, _FINGERPRINT_CHUNK):
        stop = min(start + _FINGERPRINT_CHUNK, flat.size)
        u = bits[start:stop].astype(np.uint32)
        index = np.arange(start, stop, dtype=np.uint64).astype(np.uint32)
        h = (u ^ (index * np.uint32(0x9E3779B9))) * np.uint32(0x85EBCA6B)
        total = (total + int(np.sum(h ^ (h >> np.uint32(13)), dtype=np.uint32))) % 2**32
    return {f"params/{name}": total}


def write_checkpoint(workdir: pathlib.Path, cfg: ml_collections.ConfigDict,
                     flat_params: dict[str, np.ndarray], param_axes: dict, tokenizer_name: str,
                     extra_metadata: dict[str, Any] | None = None,
                     checksums: dict[str, int] | None = None) -> pathlib.Path:
    """Saves `flat_params` (float32 NumPy) as step 0 of `workdir/checkpoints` with the items
    every jaxlm checkpoint has: state {"params"}, data, metadata (run_metadata) and
    checksums (computed here unless given). Returns the step directory."""
    import orbax.checkpoint as ocp

    from jaxlm.checkpoint_tools import _quiet_orbax

    metadata = checkpoint_lib.run_metadata(cfg, param_axes, tokenizer_name)
    metadata.update(extra_metadata or {})
    sums = dict(checksums) if checksums is not None else {}
    if checksums is None:
        for name, value in flat_params.items():
            sums.update(fingerprint(name, value))
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    total = sum(v.nbytes for v in flat_params.values())
    with _quiet_orbax():
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


def model_config_of_run(metadata: dict[str, Any]) -> ml_collections.ConfigDict:
    """The model config saved in a run's metadata, over today's defaults (older runs lack
    newer keys)."""
    saved = (metadata.get("config") or {}).get("model")
    if not saved:
        raise ValueError("the checkpoint's metadata has no model config")
    cfg = config_lib.defaults().model
    config_lib.merge_overrides(cfg, ml_collections.ConfigDict(saved), "config.model")
    return cfg
