"""Reading and writing safetensors files one tensor at a time, without mmap or pickle.

The format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
tensors' bytes (offsets relative to the end of the header). Reading parses the header and
`readinto`s one tensor's bytes at a time: the process holds one tensor, not the file (a
memory-mapped file would count every page it touched as resident memory). Writing lays out
the header first and streams each tensor after it.

Why not the `safetensors` package: its readers either memory-map the file (`safe_open`: every
page touched counts as resident) or load it whole (`load_file`), and neither reads a tensor
into a slice of a preallocated buffer (how the importer fills a layer of a stacked
parameter without a second copy); its writer (`save_file`) needs every tensor in memory at
once, while an export here holds about one parameter. The format is small and fixed, so
jaxlm reads and writes it itself; tests/convert/test_safetensors_io.py checks both
directions against the `safetensors` package (a test dependency only).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pathlib
import stat
import struct
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from jaxlm.convert.spec import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 2**20

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ConversionError):
    """A file that is not valid safetensors, or a tensor that cannot be used; names it (bad
    input to a conversion: exit 2)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    path: pathlib.Path
    dtype: str  # the safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise SafetensorsError(f"key {twice!r} appears twice in the header")
    return dict(pairs)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of one file by name (only the header is read), checked for consistency:
    each tensor's byte range has the size its dtype and shape need, lies inside the file
    and shares no byte with another tensor's."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
            text = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except SafetensorsError as e:
        raise SafetensorsError(f"{path}: {e}") from None
    except ValueError as e:
        raise SafetensorsError(f"{path}: not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not an object)")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(_count(d) for d in shape) and _count(begin) and _count(end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry")
        shape = tuple(shape)
        itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                                   f"{dtype} {shape} needs {math.prod(shape) * itemsize}")
        if not begin <= end or 8 + n + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} lies outside the file "
                                   f"(truncated download?)")
        tensors[name] = TensorInfo(name, path, dtype, shape, 8 + n + begin, end - begin)
    _check_disjoint(path, tensors)
    return tensors


def _check_disjoint(path: pathlib.Path, tensors: dict[str, TensorInfo]) -> None:
    """Two tensors reading the same bytes: a crafted or corrupted header (safetensors lays
    tensors end to end)."""
    last: TensorInfo | None = None  # of the tensors so far, the one that ends last
    for info in sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.offset):
        if last is not None and info.offset < last.offset + last.nbytes:
            raise SafetensorsError(f"{path}: tensor {info.name!r} overlaps tensor {last.name!r} "
                                   f"(both claim bytes {info.offset} to "
                                   f"{min(last.offset + last.nbytes, info.offset + info.nbytes)}"
                                   f" of the file)")
        if last is None or info.offset + info.nbytes > last.offset + last.nbytes:
            last = info


def path_kind(path: pathlib.Path) -> str | None:
    """"file", "dir", "other", or None when nothing is there. A symbolic link loop (the path
    itself, or a link on the way to it, leads back to itself) is a SafetensorsError saying
    so, as is a path that cannot be looked at: pathlib's is_file/is_dir would answer False,
    which reads as "not found"."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SafetensorsError(f"{path}: symbolic link loop (the path, or a link on the way "
                                   f"to it, leads back to itself)") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise SafetensorsError(f"cannot look at {path}: {e.strerror or e}") from None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def read_tensor(info: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor's values in its stored dtype; read straight into `out` when given (a
    C-contiguous array of that dtype and shape), else into a new array."""
    if info.dtype not in DTYPES:
        raise SafetensorsError(f"{info.path}: tensor {info.name!r} has dtype {info.dtype}, "
                               f"which jaxlm does not read")
    dtype = DTYPES[info.dtype]
    if out is None:
        out = np.empty(info.shape, dtype)
    assert out.dtype == dtype and out.shape == info.shape and out.flags.c_contiguous
    view = memoryview(out.reshape(-1).view(np.uint8))
    try:
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            done = 0
            while done < info.nbytes:  # readinto may return less than asked
                got = f.readinto(view[done:])
                if not got:
                    raise SafetensorsError(f"{info.path}: tensor {info.name!r} is truncated")
                done += got
    except OSError as e:
        raise SafetensorsError(f"{info.path}: cannot read tensor {info.name!r}: "
                               f"{e.strerror or e}") from None
    return out


def checkpoint_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a Hugging Face checkpoint directory: the shards its
    model.safetensors.index.json names (every one must exist) or model.safetensors.
    Pickled PyTorch weights are refused: loading them would run arbitrary code."""
    index = hf_dir / INDEX_FILE
    if path_kind(index) == "file":
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SafetensorsError(f"{index}: not a safetensors index ({e!r})") from None
        except OSError as e:
            raise SafetensorsError(f"cannot read {index}: {e.strerror or e}") from None
        for name in names:
            if not isinstance(name, str) or not name or pathlib.Path(name).name != name:
                raise SafetensorsError(f"{index}: shard name {name!r} is not a file name")
            if path_kind(hf_dir / name) != "file":
                raise SafetensorsError(f"missing shard {hf_dir / name} (named by {index})")
        return [hf_dir / name for name in names]
    if path_kind(hf_dir / SINGLE_FILE) == "file":
        return [hf_dir / SINGLE_FILE]
    pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(
        p.name for p in hf_dir.glob("*.pt")) + sorted(p.name for p in hf_dir.glob("*.pth"))
    if pickles:
        raise SafetensorsError(
            f"{hf_dir} holds PyTorch pickle weights ({', '.join(pickles[:3])}) and no "
            f"{SINGLE_FILE} or {INDEX_FILE}: jaxlm reads safetensors only, since loading a "
            f"pickle can run arbitrary code. Convert them to safetensors first in an environment "
            f"you trust (e.g. transformers' save_pretrained).")
    raise SafetensorsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir}")


def read_headers(files: Iterable[pathlib.Path]) -> dict[str, TensorInfo]:
    """Every tensor of a (sharded) checkpoint by name; a name in two files is an error."""
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise SafetensorsError(f"tensor {name!r} is in both {tensors[name].path} and {path}")
            tensors[name] = info
    return tensors


# ---- writing ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its shape and dtype now, its values when `produce` is called."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor is a shard alone)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


def write_file(path: pathlib.Path, plans: list[TensorPlan]) -> None:
    """Writes one safetensors file, producing (and dropping) one tensor at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers requires format "pt"
    offset = 0
    for plan in plans:
        header[plan.name] = {"dtype": _NAMES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for plan in plans:
            value = np.asarray(plan.produce(), dtype=plan.dtype)
            if not value.flags.c_contiguous:  # (ascontiguousarray would make a 0-d array 1-d)
                value = value.copy(order="C")
            if value.shape != plan.shape:
                raise SafetensorsError(f"{plan.name}: produced shape {value.shape}, "
                                       f"planned {plan.shape}")
            f.write(memoryview(value.reshape(-1).view(np.uint8)))
            del value
    os.replace(tmp, path)


def write_checkpoint(directory: pathlib.Path, plans: list[TensorPlan],
                     max_shard_bytes: int) -> list[pathlib.Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards and their index."""
    shards = plan_shards(plans, max_shard_bytes)
    if len(shards) == 1:
        write_file(directory / SINGLE_FILE, shards[0])
        return [directory / SINGLE_FILE]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        path = directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(path, shard)
        paths.append(path)
        weight_map.update({plan.name: path.name for plan in shard})
    index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def iter_by_file(tensors: dict[str, TensorInfo]) -> Iterator[TensorInfo]:
    """Tensors file by file, in the order of their bytes (sequential reads)."""
    yield from sorted(tensors.values(), key=lambda t: (str(t.path), t.offset))
