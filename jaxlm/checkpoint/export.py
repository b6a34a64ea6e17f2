"""`jaxlm checkpoint export-params`: one checkpoint's parameters, in a chosen dtype.

An export is an Orbax checkpoint of the parameter tree alone (StandardSave, no optimizer
state) in the chosen dtype, with `jaxlm_params.json` (config, layout, tokenizer, source step,
dtype) and a copy of the run's `tokenizer/` beside the arrays; `load_exported_params` reads it
back. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlm import __version__
from jaxlm.checkpoint.rundir import (
    RunDirError,
    locate,
    new_output,
    open_readonly,
    quiet_orbax,
    reading,
    resolve_step,
)

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
EXPORT_INFO_FILE = "jaxlm_params.json"
EXPORT_FORMAT = "jaxlm.params/1"


def read_params(path: str | os.PathLike, step: int | None = None) -> tuple[Any, dict, int]:
    """(params on one CPU device in their saved dtype, the run metadata, the step). Only the
    parameters are read, not the optimizer state."""

    location = locate(path, step)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    with open_readonly(location.checkpoints) as manager:
        step = resolve_step(manager, location)
        with reading(location.checkpoints / str(step)):
            state_meta = manager.item_metadata(step)["state"]
            tree = state_meta.tree if hasattr(state_meta, "tree") else state_meta
            if "params" not in tree:
                raise RunDirError(
                    f"no params in {location.checkpoints / str(step) / 'state'}")
            target = {"params": jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu),
                tree["params"])}
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True),
                metadata=ocp.args.JsonRestore()))
    return restored["state"]["params"], restored["metadata"] or {}, step


def cast_params(params: Any, dtype: str) -> Any:
    """Floating-point leaves cast to `dtype` (round to nearest even); others unchanged."""

    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def export_params(path: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
                  step: int | None = None) -> dict[str, Any]:
    """Writes the parameters of one checkpoint, cast to `dtype`, as an Orbax checkpoint at
    `out` (StandardSave of the parameter tree), with `jaxlm_params.json` and the run's
    tokenizer files beside it. Returns what jaxlm_params.json says."""

    if dtype not in EXPORT_DTYPES:
        raise RunDirError(
            f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    out = new_output(out)
    location = locate(path, step)
    params, run_meta, step = read_params(path, step)
    params = cast_params(params, dtype)
    if out.exists():
        out.rmdir()  # Orbax writes into a temporary directory and renames it to `out`
    out.parent.mkdir(parents=True, exist_ok=True)
    with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out, params)
        checkpointer.wait_until_finished()

    leaves = jax.tree.leaves(params)
    info = {
        "format": EXPORT_FORMAT,
        "dtype": dtype,
        "param_count": int(sum(x.size for x in leaves)),
        "param_bytes": int(sum(x.nbytes for x in leaves)),
        "source": {"workdir": str(location.workdir), "step": step,
                   "path": str(location.checkpoints / str(step))},
        "exported_by": __version__,
        "jaxlm_version": run_meta.get("jaxlm_version"),
        "tokenizer": run_meta.get("tokenizer"),
        "config": run_meta.get("config"),
        "layout": run_meta.get("layout"),
    }
    tokenizer_dir = location.workdir / "tokenizer"
    if tokenizer_dir.is_dir():
        shutil.copytree(tokenizer_dir, out / "tokenizer")
    (out / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_exported_params(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(params on one CPU device, jaxlm_params.json) of an `export-params` directory."""

    directory = pathlib.Path(directory).expanduser().absolute()
    info_file = directory / EXPORT_INFO_FILE
    if not info_file.is_file():
        raise RunDirError(f"not a jaxlm params export (no {EXPORT_INFO_FILE}): {directory}")
    info = json.loads(info_file.read_text())
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(directory).item_metadata
        tree = meta.tree if hasattr(meta, "tree") else meta
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu),
                              tree)
        params = checkpointer.restore(directory, target)
    return params, info


