"""The run directory: the one API for finding a run's checkpoints and reading what a run
says about itself, without a config.

    WORKDIR/
      checkpoints/<step>/{state,data,metadata,checksums}   (jaxlm.checkpoint.manager)
      tokenizer/                                           (jaxlm.data.tokenizers)
      metrics.jsonl, tensorboard/                          (jaxlm.train.metrics)

Every command that reads a run goes through here: `locate` accepts WORKDIR,
WORKDIR/checkpoints or WORKDIR/checkpoints/STEP; `latest_step_dir`, `saved_config`,
`read_metadata` and `load_tokenizer` read a step's JSON items and the run's tokenizer. Reads
go through Orbax's own view of the directory (the one a resume uses): only finalized steps
count, and nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
from typing import Any, Iterator

import ml_collections
import orbax.checkpoint as ocp

from jaxlm import config as config_lib
from jaxlm.data import tokenizers
from jaxlm.errors import UserError

ITEMS = ("state", "data", "metadata")  # what every jaxlm checkpoint step holds


class RunDirError(UserError):
    """A bad path or an unusable checkpoint; the message names it."""


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a command looks: the run's `checkpoints` directory and, if given, one step."""

    workdir: pathlib.Path
    checkpoints: pathlib.Path
    step: int | None  # None: the latest finalized step


def locate(path: str | os.PathLike, step: int | None = None) -> Location:
    """Accepts WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/STEP."""
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists():
        raise RunDirError(f"no such directory: {path}")
    if (path / "checkpoints").is_dir():
        checkpoints = path / "checkpoints"
    elif path.is_dir() and path.name == "checkpoints":
        checkpoints = path
    elif ".orbax-checkpoint-tmp" in path.name:
        raise RunDirError(f"an unfinished save, not a checkpoint (a resume ignores it): "
                                  f"{path}")
    elif path.is_dir() and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise RunDirError(f"--step {step} contradicts the step directory {path}")
        checkpoints, step = path.parent, int(path.name)
    else:
        raise RunDirError(
            f"no checkpoints directory: {path / 'checkpoints'} does not exist "
            f"(expected WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/STEP)")
    return Location(checkpoints.parent, checkpoints, step)


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Orbax logs a warning for every read-only manager; the tools print their own lines."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def open_readonly(checkpoints: pathlib.Path):
    """A read-only CheckpointManager over the run's items: it never creates, deletes or
    cleans up anything. The state is read with the PyTree handler (the format
    StandardSave writes), which can restore a part of the tree. `checksums` (array
    fingerprints) is registered so that steps which have it open cleanly; it is not read."""

    # No root metadata: writing it is a barrier across processes, and a read-only look
    # may happen on one process only (or on each at its own moment).
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           save_root_metadata=False)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "metadata": ocp.JsonCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler()}
    with quiet_orbax():
        manager = ocp.CheckpointManager(checkpoints, options=options, item_handlers=handlers)
    try:
        with quiet_orbax():
            yield manager
    finally:
        manager.close()


@contextlib.contextmanager
def reading(step_dir: pathlib.Path) -> Iterator[None]:
    """Any failure to read a step (missing items, damaged files) as one clean error."""
    try:
        yield
    except RunDirError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise RunDirError(f"cannot read checkpoint {step_dir}: "
                                  f"{type(e).__name__}: {str(e)[:500]}") from e


def resolve_step(manager, location: Location) -> int:
    steps = manager.all_steps()
    if location.step is None:
        if not steps:
            raise RunDirError(f"no finalized checkpoint in {location.checkpoints}")
        return max(steps)
    if location.step not in steps:
        raise RunDirError(
            f"not a finalized checkpoint: {location.checkpoints / str(location.step)} "
            f"(finalized steps: {sorted(steps) or 'none'})")
    return location.step


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether WORKDIR/checkpoints holds a step directory (finalized or not)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def finalized_steps(checkpoints: pathlib.Path) -> list[int]:
    """The finalized steps of a `checkpoints/` directory, newest first (what a resume sees)."""
    with open_readonly(checkpoints) as manager:
        return sorted(manager.all_steps(), reverse=True)


def latest_step_dir(path: str | os.PathLike, step: int | None = None) -> pathlib.Path:
    """The step directory of `path` (its newest finalized step, or `step`)."""
    location = locate(path, step)
    with open_readonly(location.checkpoints) as manager:
        return location.checkpoints / str(resolve_step(manager, location))


def read_metadata(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The `metadata` item of one step (config, layout, tokenizer, what the run recorded)."""

    step_dir = pathlib.Path(step_dir)
    with reading(step_dir), quiet_orbax():
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "metadata") or {}


def config_of(metadata: dict[str, Any], where: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config saved in a step's metadata, over today's defaults (keys this jaxlm added
    since take their defaults)."""
    saved = metadata.get("config")
    if not saved:
        raise RunDirError(f"checkpoint {where} has no config in its metadata")
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    config_lib.move_keys(saved)
    sources = saved.get("data", {}).pop("sources", {})
    cfg = config_lib.defaults()
    config_lib.merge_overrides(cfg, ml_collections.ConfigDict(saved))
    cfg.data.sources = ml_collections.ConfigDict(sources)
    return cfg


def saved_config(path: str | os.PathLike, step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
    """(the config saved with the newest checkpoint of `path`, or with `step`; that step's
    directory). Reads JSON only."""
    step_dir = latest_step_dir(path, step)
    return config_of(read_metadata(step_dir), step_dir), step_dir


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The tokenizer a run saved (WORKDIR/tokenizer); `path` as `locate` takes it."""
    return tokenizers.load_saved(locate(path).workdir / "tokenizer")


def new_output(out: str | os.PathLike) -> pathlib.Path:
    """The absolute path of a directory a command is about to create (a derived run, an
    export): RunDirError, before anything is read, when it exists and is not empty."""
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"output exists and is not an empty directory: {out}")
    return out
