"""`jaxlm checkpoint {ls,inspect,export-params}`: look into a run's checkpoints without a config.

    jaxlm checkpoint ls WORKDIR
    jaxlm checkpoint inspect WORKDIR [--step N] [--json]
    jaxlm checkpoint export-params WORKDIR --out DIR [--dtype bfloat16] [--step N]

WORKDIR may also be `WORKDIR/checkpoints` or one step, `WORKDIR/checkpoints/STEP`; without a
step the latest finalized one is used. Everything is read through Orbax's own view of the
directory (the same one `jaxlm train` resumes from): only finalized steps count, shapes and
dtypes come from Orbax's array metadata without reading the arrays, and the JSON items are
read as JSON. Nothing is unpickled.

Paths are resolved and read through jaxlm.checkpoint.rundir; the export lives in
jaxlm.checkpoint.export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import time
from typing import Any, Iterator

import numpy as np
import orbax.checkpoint as ocp

from jaxlm.checkpoint.rundir import (
    ITEMS,
    locate,
    open_readonly,
    quiet_orbax,
    reading,
    resolve_step,
)

# ---- ls ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepEntry:
    step: int
    path: pathlib.Path
    nbytes: int
    saved_at: float  # seconds since the epoch: Orbax's commit time, else the directory's mtime
    latest: bool
    missing: tuple[str, ...] = ()  # items a jaxlm checkpoint has that this step lacks


@dataclasses.dataclass(frozen=True)
class OtherEntry:
    """A directory entry that is not a finalized step: an interrupted save, or a step that
    a resume set aside as damaged (`<step>.corrupt`)."""

    name: str
    path: pathlib.Path
    nbytes: int
    modified_at: float


@dataclasses.dataclass(frozen=True)
class Listing:
    checkpoints: pathlib.Path
    steps: list[StepEntry]  # ascending
    incomplete: list[OtherEntry]  # interrupted saves (Orbax's temporary directories)
    other: list[OtherEntry]  # anything else that is not a step, e.g. `<step>.corrupt`

    @property
    def latest(self) -> int | None:
        return self.steps[-1].step if self.steps else None


def disk_bytes(path: pathlib.Path) -> int:
    """Total size of the files under `path` (apparent size, links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def list_checkpoints(path: str | os.PathLike) -> Listing:
    """The finalized steps of a run (what a resume would see) and any unfinished saves."""

    location = locate(path)
    with open_readonly(location.checkpoints) as manager:
        steps = sorted(manager.all_steps())
        entries = []
        for step in steps:
            step_dir = location.checkpoints / str(step)
            saved_at = step_dir.stat().st_mtime
            with contextlib.suppress(Exception):  # older saves may lack the step metadata
                commit_ns = manager.metadata(step).commit_timestamp_nsecs
                if commit_ns:
                    saved_at = commit_ns / 1e9
            missing = tuple(item for item in ITEMS if not (step_dir / item).is_dir())
            entries.append(StepEntry(step, step_dir, disk_bytes(step_dir), saved_at,
                                     latest=step == steps[-1], missing=missing))
    incomplete, other = [], []
    finalized = {str(e.step) for e in entries}
    for child in sorted(location.checkpoints.iterdir()):
        if child.name in finalized or child.name.startswith(".write_probe"):
            continue
        with quiet_orbax():
            temporary = child.is_dir() and ocp.path.step.is_path_temporary(child)
        size = disk_bytes(child) if child.is_dir() else child.lstat().st_size
        entry = OtherEntry(child.name, child, size, child.lstat().st_mtime)
        (incomplete if temporary else other).append(entry)
    return Listing(location.checkpoints, entries, incomplete, other)


def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError


def format_age(seconds: float) -> str:
    """90 -> '1m ago'."""
    seconds = max(0.0, seconds)
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{int(seconds // div)}{unit} ago"
    return f"{int(seconds // 86400)}d ago"


def format_listing(listing: Listing, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"checkpoints in {listing.checkpoints}"]
    if not listing.steps:
        lines.append("  no finalized checkpoints")
    else:
        width = max(4, max(len(str(e.step)) for e in listing.steps))
        lines.append(f"  {'step':>{width}}  {'size':>10}  {'saved (UTC)':<19}  {'age':>8}")
        for e in listing.steps:
            saved = datetime.datetime.fromtimestamp(e.saved_at, datetime.timezone.utc)
            lines.append(f"  {e.step:>{width}}  {format_bytes(e.nbytes):>10}  "
                         f"{saved:%Y-%m-%d %H:%M:%S}  {format_age(now - e.saved_at):>8}"
                         + ("  latest" if e.latest else "")
                         + (f"  MISSING {','.join(e.missing)}" if e.missing else ""))
    for title, entries in (("incomplete (ignored):", listing.incomplete),
                           ("other entries (ignored):", listing.other)):
        if entries:
            lines.append(title)
            lines += [f"  {e.name}  {format_bytes(e.nbytes)}  {format_age(now - e.modified_at)}"
                      for e in entries]
    return "\n".join(lines)


# ---- inspect ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamEntry:
    name: str  # the path in the parameter tree, joined with '/'
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str, ...] | None  # logical axis names from the run's layout; None if absent
    size: int  # elements
    nbytes: int


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, leaf) of a tree of dicts and lists, in sorted key order; None is no leaf."""
    if isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from _flatten(tree[key], prefix + (str(key),))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flatten(value, prefix + (str(i),))
    elif tree is not None:
        yield prefix, tree


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def inspect_checkpoint(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """What one checkpoint holds, from metadata only (no array is read)."""

    location = locate(path, step)
    with open_readonly(location.checkpoints) as manager:
        step = resolve_step(manager, location)
        with reading(location.checkpoints / str(step)):
            state_meta = manager.item_metadata(step)["state"]
            json_items = manager.restore(step, args=ocp.args.Composite(
                data=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
    tree = state_meta.tree if hasattr(state_meta, "tree") else state_meta
    run_meta, data_state = json_items["metadata"] or {}, json_items["data"] or {}
    layout = run_meta.get("layout", {})
    axes_tree = layout.get("param_axes", {})

    params = []
    for keys, meta in _flatten(tree.get("params", {})):
        shape, dtype = tuple(int(d) for d in meta.shape), np.dtype(meta.dtype)
        axes = _lookup(axes_tree, keys)
        params.append(ParamEntry("/".join(keys), shape, dtype.name,
                                 tuple(axes) if isinstance(axes, list) else None,
                                 math.prod(shape), _nbytes(shape, dtype)))
    opt_leaves = [m for _, m in _flatten(tree.get("opt_state", {})) if hasattr(m, "shape")]
    return {
        "path": str(location.checkpoints / str(step)),
        "step": step,
        "jaxlm_version": run_meta.get("jaxlm_version"),
        "tokenizer": run_meta.get("tokenizer"),
        "tokenizer_dir": str(location.workdir / "tokenizer"),
        "config": run_meta.get("config"),
        "layout": {"scan_layers": layout.get("scan_layers")},
        "params": params,
        "param_count": sum(p.size for p in params),
        "param_bytes": sum(p.nbytes for p in params),
        "opt_state": {"leaves": len(opt_leaves),
                      "bytes": sum(_nbytes(tuple(m.shape), m.dtype) for m in opt_leaves)},
        "data_state_version": data_state.get("version"),
    }


def format_inspection(info: dict[str, Any]) -> str:
    lines = [f"checkpoint {info['path']}",
             f"  step          {info['step']}",
             f"  jaxlm version {info['jaxlm_version']}",
             f"  tokenizer     {info['tokenizer']} (files in {info['tokenizer_dir']})",
             f"  layout        scan_layers={info['layout']['scan_layers']}",
             f"  data iterator state version {info['data_state_version']}",
             "config:"]
    for section, values in sorted((info["config"] or {}).items()):
        lines.append(f"  {section}: {json.dumps(values, sort_keys=True)}")
    rows = [(p.name, str(tuple(p.shape)), p.dtype,
             "(" + ", ".join(p.axes) + ")" if p.axes is not None else "?",
             f"{p.size:,}", format_bytes(p.nbytes)) for p in info["params"]]
    header = ("parameter", "shape", "dtype", "logical axes", "size", "bytes")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    right = (False, False, False, False, True, True)

    def row(cells):
        return "  " + "  ".join(c.rjust(w) if r else c.ljust(w)
                                for c, w, r in zip(cells, widths, right)).rstrip()

    lines += [f"parameters: {len(info['params'])} arrays, {info['param_count']:,} values, "
              f"{format_bytes(info['param_bytes'])}", row(header)]
    lines += [row(r) for r in rows]
    lines.append(f"optimizer state: {info['opt_state']['leaves']} arrays, "
                 f"{format_bytes(info['opt_state']['bytes'])}")
    return "\n".join(lines)


def inspection_json(info: dict[str, Any]) -> str:
    return json.dumps({**info, "params": [dataclasses.asdict(p) for p in info["params"]]}, indent=2)
