"""Orbax checkpoints of the train state, the data-iterator position and run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,data,metadata}`. Orbax writes each step into a
temporary directory and renames it when complete, so an interrupted save is never listed
as a step and a resume picks the latest complete one. Saves are asynchronous: training
continues while the bytes are written. Restoring reads only TensorStore arrays and JSON;
nothing is unpickled.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from jaxlm.train.state import TrainState

ITEMS = ("state", "data", "metadata")


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, ckpt_cfg: ml_collections.ConfigDict):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=ckpt_cfg.keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, metadata: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            metadata=ocp.args.JsonSave(metadata)))

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict, dict]:
        """The state at `step`, placed with `abstract_state`'s shardings (the current mesh)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            metadata=ocp.args.JsonRestore()))
        return restored["state"], restored["data"], restored["metadata"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def run_metadata(cfg: ml_collections.ConfigDict, param_axes: Any, tokenizer: str) -> dict[str, Any]:
    """What a checkpoint says about itself: config, parameter layout, jaxlm version and
    tokenizer (its files are in the run's `tokenizer/` directory)."""
    from jaxlm import __version__
    return {"jaxlm_version": __version__, "config": cfg.to_dict(), "tokenizer": tokenizer,
            "layout": {"scan_layers": cfg.model.scan_layers, "param_axes": _listify(param_axes)}}


def _listify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _listify(v) for k, v in tree.items()}
    return list(tree)
