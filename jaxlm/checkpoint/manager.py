"""Saving and restoring a run's state: Orbax checkpoints of the train state, the data
position and the run's metadata, checked against fingerprints on restore.

Layout: `<workdir>/checkpoints/<step>/{state,data,metadata,checksums}`. Orbax writes a step
into `<step>.orbax-checkpoint-tmp*` and renames it when complete: a killed save is never a
step (its leftover is removed when a Checkpointer next opens the directory). Saves are
asynchronous. Restoring reads only TensorStore arrays and JSON; nothing is unpickled.
Each save records a fingerprint of every array (jaxlm.checkpoint.fingerprint) and every
restore compares them.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import pathlib
import shutil
import time
from typing import Any, Iterator, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm import __version__
from jaxlm.checkpoint import rundir
from jaxlm.checkpoint.damage import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    is_out_of_space,
    newest_good,
    warn,
)
from jaxlm.checkpoint.fingerprint import checksums, flat_names
from jaxlm.errors import StorageFailure, UserError

ITEMS = ("state", "data", "metadata", "checksums")


class SaveTiming(NamedTuple):
    """A completed save: its step, seconds from its start until it was finalized on disk,
    and seconds the training step waited for it (the device-to-host copy)."""
    step: int
    seconds: float
    training_paused_s: float

    def describe(self) -> str:
        return (f"checkpoint {self.step} saved in {self.seconds:.2f} s (training paused "
                f"{self.training_paused_s:.2f} s)")


class CheckpointStorageError(UserError, OSError):
    """The checkpoint directory is not writable or lacks space."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """Nothing that looks like a checkpoint at the path given."""


class AllCheckpointsDamagedError(UserError):
    """Every checkpoint of a run is damaged, and starting over was not asked for."""




class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, ckpt_cfg: ml_collections.ConfigDict):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.cfg = ckpt_cfg
        self._manager: ocp.CheckpointManager | None = None
        self._last_save_start = time.monotonic()
        self._failed = False  # a save failed for lack of space (already reported)
        # Saves started and not yet finalized, oldest first (Orbax runs one at a time): step,
        # start time, seconds the caller waited (set when manager.save returns).
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._finished: list[SaveTiming] = []  # appended by Orbax's finalization thread

    @property
    def manager(self) -> ocp.CheckpointManager:
        """Opened on first use, so `check_capacity` can report an unusable directory first."""
        if self._manager is None:
            # Retention: the newest `keep` steps, plus every multiple of `keep_period` forever.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.cfg.keep, keep_period=self.cfg.keep_period or None,
                create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._on_saved))
            # Uncompressed: zstd saves ~8% of float weights' bytes, but on a busy host its
            # CPU time comes out of the training step running alongside the async write.
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=ITEMS,
                item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=False)})
        return self._manager

    def check_capacity(self, state_bytes: int) -> None:
        """`check_capacity` for the checkpoints still to be written: `keep` plus the one
        written before the oldest is deleted, less those already on disk (at least one).
        Opens the manager first, which removes the leftovers of killed saves (their space
        counts as free)."""
        check_capacity(self.directory, 0)  # writable, before Orbax touches it
        coming = max(1, self.cfg.keep + 1 - len(self.manager.all_steps()))
        check_capacity(self.directory, state_bytes, count=coming)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, last_step: int, check_clock: bool = True) -> bool:
        """Every `every` steps, at the final step, and when `every_minutes` have passed
        since the last save started. With several processes process 0's clock decides for
        all, which costs a collective: the loop asks only at steps that sync anyway
        (`check_clock`)."""
        if step == last_step or (self.cfg.every and step % self.cfg.every == 0):
            return True
        if not self.cfg.every_minutes or (jax.process_count() > 1 and not check_clock):
            return False
        due = time.monotonic() - self._last_save_start >= 60.0 * self.cfg.every_minutes
        if jax.process_count() > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    def save(self, step: int, state: Any, data_state: dict, metadata: dict) -> bool:
        """Starts an asynchronous save; False (with a warning) if Orbax declined the step.
        A previous save that failed for lack of space raises StorageFailure here."""
        self._last_save_start = start = time.monotonic()
        # Queued before Orbax starts it: the save may be finalized before save() returns.
        timing = {"step": step, "start": start, "paused": None}
        self._pending.append(timing)
        try:
            with self._storage_errors(step):
                saved = self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
                    metadata=ocp.args.JsonSave(metadata),
                    checksums=ocp.args.JsonSave(checksums(state))))
        except BaseException:
            self._pending.remove(timing)
            raise
        timing["paused"] = time.monotonic() - start
        if not saved:
            self._pending.remove(timing)
            warn(f"step {step} not saved: {self.directory} has step {self.latest_step()}")
        return saved

    def _on_saved(self) -> None:
        """Orbax's post-finalization callback (its thread): the oldest pending save is done."""
        if self._pending:
            timing = self._pending.popleft()
            seconds = time.monotonic() - timing["start"]
            paused = timing["paused"] if timing["paused"] is not None else seconds
            self._finished.append(SaveTiming(timing["step"], seconds, paused))

    def finished_saves(self) -> list[SaveTiming]:
        """The saves completed (on disk, finalized) since the last call, oldest first."""
        done, self._finished = self._finished, []
        return done

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """The state at `step`, placed with `abstract_state`'s shardings (the current mesh,
        whichever mesh saved it), checked against the fingerprints saved with it."""
        path = self.directory / str(step)
        saved = saved_arrays(path)
        _check_structure(saved, abstract_state, path)
        args = dict(state=ocp.args.PyTreeRestore(
                        item=abstract_state,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
                    data=ocp.args.JsonRestore(),
                    metadata=ocp.args.JsonRestore())
        has_sums = (path / "checksums").exists()  # absent in checkpoints older than them
        if has_sums:
            args["checksums"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        _verify(restored["state"], restored["checksums"] if has_sums else None, saved, path)
        return restored["state"], restored["data"], restored["metadata"]

    def latest_metadata(self) -> tuple[int, dict] | None:
        """(step, metadata) of the newest finalized step whose metadata reads, or None:
        what a resume will be checked against, read before anything is written."""
        if not self.directory.is_dir():
            return None
        for step in rundir.finalized_steps(self.directory):  # read-only: nothing cleaned up
            try:
                return step, rundir.read_metadata(self.directory / str(step))
            except rundir.RunDirError:
                continue
        return None

    def restore_latest(self, abstract_state: Any
                       ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, metadata) of the newest checkpoint that restores cleanly,
        or None when there is none. Damaged newer ones are reported, skipped and renamed
        `<step>.corrupt`. When every checkpoint is damaged nothing is touched and
        AllCheckpointsDamagedError is raised, unless checkpoint.on_all_corrupt="restart"
        (they are set aside and None is returned: the run starts again)."""
        self.manager.reload()
        result, failed = newest_good(
            [self.directory / str(s) for s in sorted(self.manager.all_steps(), reverse=True)],
            lambda d: (int(d.name), *self.restore(int(d.name), abstract_state)))
        if failed and result is None and self.cfg.on_all_corrupt != "restart":
            raise AllCheckpointsDamagedError(
                f"every checkpoint in {self.directory} is damaged; nothing was changed:\n"
                + "\n".join(f"  step {d.name}: {why}" for d, why in failed)
                + "\nto start again from step 0, setting them aside as <step>.corrupt, add "
                  "--config.checkpoint.on_all_corrupt=restart")
        if failed:
            if jax.process_index() == 0:
                for step_dir, _ in failed:
                    target = step_dir.with_name(f"{step_dir.name}.corrupt")
                    if target.exists():
                        target = step_dir.with_name(f"{step_dir.name}.corrupt-{time.time_ns()}")
                    step_dir.rename(target)
                    warn(f"moved damaged checkpoint {step_dir} to {target}")
            if result is None:
                warn(f"every checkpoint in {self.directory} was damaged: starting again from "
                      f"step 0 (checkpoint.on_all_corrupt=restart)")
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jaxlm: damaged checkpoints set aside")
            self.manager.reload()
        return result

    @contextlib.contextmanager
    def _storage_errors(self, step: int | None = None) -> Iterator[None]:
        """A write that failed for lack of space (here or in the background save it
        waits for) as StorageFailure, naming what is kept."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
            if not is_out_of_space(e):
                raise
            self._failed = True
            kept = ", ".join(str(s) for s in sorted(self.manager.all_steps())) or "none"
            raise StorageFailure(
                f"no space left in {self.directory} while saving"
                + (f" (before step {step})" if step is not None else "")
                + f"; the complete checkpoints are kept (steps: {kept}); free space and run "
                  f"the same command again") from None

    def wait(self) -> None:
        if self._failed:
            return
        with self._storage_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        # After a failed save Orbax's threads are still failing; closing its event loops
        # under them only adds errors (the failure was reported by save/wait).
        if self._manager is not None and not self._failed:
            self._manager.close()


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """The parameters of a checkpoint, placed with `abstract_params`' shardings (see
    `restore_groups`)."""
    return restore_groups(path, {"params": abstract_params})["params"]


def restore_groups(path: str | os.PathLike, abstract: dict[str, Any]) -> dict[str, Any]:
    """Some top-level groups of a checkpoint's state (e.g. {"params"}, or {"adapters",
    "head"}), placed with the shardings of `abstract`'s ShapeDtypeStructs; nothing else is
    read. `path` is a run directory or its `checkpoints/` directory (the newest step that
    restores cleanly) or one step directory `.../checkpoints/<step>`."""
    path = pathlib.Path(path).absolute()
    try:
        location = rundir.locate(path)
    except rundir.RunDirError as e:  # its words: no such directory, an unfinished save, ...
        raise CheckpointNotFoundError(str(e)) from None
    if location.step is not None:
        candidates = [location.checkpoints / str(location.step)]
    else:
        candidates = [location.checkpoints / str(s)
                      for s in rundir.finalized_steps(location.checkpoints)]
    if not candidates:
        raise CheckpointNotFoundError(f"no checkpoint at {path}: expected a run directory, its "
                                      f"checkpoints/ directory or a step directory in it")
    item = dict(abstract)

    def restore_one(step_dir: pathlib.Path) -> Any:
        saved = saved_arrays(step_dir)
        _check_structure(saved, item, step_dir, prefix=tuple(f"{g}/" for g in item))
        restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            step_dir / "state", args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))  # reads only these groups' arrays
        sums = (ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "checksums")
                if (step_dir / "checksums").exists() else None)
        _verify(restored, sums, saved, step_dir)
        return restored

    groups, failed = newest_good(candidates, restore_one)
    if groups is None:
        raise CorruptCheckpointError(f"no checkpoint at {path} restores cleanly: "
                                     + "; ".join(f"{d}: {why}" for d, why in failed))
    return groups

def check_capacity(directory: str | os.PathLike, state_bytes: int, count: int = 2) -> None:
    """Fails now, not at the first save, when `directory` cannot be written (a probe file
    is written, fsynced and deleted) or has less free space than `count` checkpoints."""
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe_{jax.process_index()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointStorageError(
            f"checkpoint directory {directory} is not writable: {e}") from e
    free, needed = shutil.disk_usage(directory).free, count * state_bytes
    if free < needed:
        raise CheckpointStorageError(
            f"checkpoint directory {directory} has {free:,} bytes free; {needed:,} bytes are "
            f"needed ({count} more checkpoints of {state_bytes:,} bytes: checkpoint.keep and "
            f"the one written before the oldest is deleted, less those on disk)")


def state_nbytes(abstract_state: Any) -> int:
    """Bytes of one checkpoint of the (global) arrays in the tree, before compression."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(abstract_state) if hasattr(x, "dtype"))


# ---- structure and fingerprint checks ------------------------------------------------

def saved_arrays(step_dir: pathlib.Path) -> dict[str, Any]:
    """The checkpoint's arrays (shape, dtype) by name, from its JSON tree metadata."""
    tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
    return {k: v for k, v in flat_names(tree).items() if hasattr(v, "shape")}


def _check_structure(saved: dict[str, Any], abstract: Any, where: pathlib.Path,
                     prefix: str | tuple[str, ...] = "") -> None:
    wanted = flat_names(abstract)
    for name, leaf in wanted.items():
        have = f"shape {tuple(saved[name].shape)}" if name in saved else "missing"
        if have != f"shape {tuple(leaf.shape)}":
            raise CheckpointMismatchError(f"checkpoint {where}: {name!r} is {have}; the model "
                                          f"expects shape {tuple(leaf.shape)}")
    extra = [n for n in saved if n.startswith(prefix) and n not in wanted]
    if extra:
        raise CheckpointMismatchError(f"checkpoint {where} has {extra[0]!r}, which the model "
                                      f"lacks ({len(extra)} such arrays)")


def _verify(restored: Any, expected: dict[str, int] | None, saved: dict[str, Any],
            where: pathlib.Path) -> None:
    if expected is None:  # a checkpoint from before fingerprints
        return
    # A leaf restored with another dtype than it was saved with is cast: not comparable.
    actual = checksums({k: v for k, v in flat_names(restored).items()
                        if k in saved and np.dtype(saved[k].dtype) == np.dtype(v.dtype)})
    for name, value in actual.items():
        if name in expected and expected[name] != value:
            raise CorruptCheckpointError(f"checkpoint {where}: {name!r} does not match the "
                                         f"fingerprint saved with it (damaged data)")


def write_derived_run(out: pathlib.Path, step: int, tree: dict[str, Any],
                      metadata: dict[str, Any], checkpoint_cfg: ml_collections.ConfigDict,
                      source: pathlib.Path) -> pathlib.Path:
    """Writes a run made from run `source` (`jaxlm lora merge`, `quantize`, `prune`): one
    checkpoint of `tree` at `step` with `metadata`, and a copy of the source's tokenizer/.
    `out` comes from rundir.new_output. Returns the step directory."""
    checkpointer = Checkpointer(out, checkpoint_cfg)
    try:
        checkpointer.save(step, tree, {}, metadata)
        checkpointer.wait()
    finally:
        checkpointer.close()
    if (source / "tokenizer").is_dir():
        shutil.copytree(source / "tokenizer", out / "tokenizer")
    return out / "checkpoints" / str(step)


def run_metadata(cfg: ml_collections.ConfigDict, param_axes: Any, tokenizer: str) -> dict[str, Any]:
    """What a checkpoint says about itself: config, parameter layout, jaxlm version and
    tokenizer (its files are in the run's `tokenizer/` directory)."""
    return {"jaxlm_version": __version__, "config": cfg.to_dict(), "tokenizer": tokenizer,
            "layout": {"scan_layers": cfg.model.scan_layers, "param_axes": _listify(param_axes)}}


def _listify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _listify(v) for k, v in tree.items()}
    return list(tree)
