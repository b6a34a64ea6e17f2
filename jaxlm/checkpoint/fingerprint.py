"""The fingerprint of an array, saved with every checkpoint and compared on every restore.

TensorStore does not checksum chunk data (garbage inside a chunk can restore as wrong
numbers), so each save records one uint32 per array and each restore recomputes it:

    fingerprint = sum over elements of h ^ (h >> 13),  h = (bits ^ (i * 0x9E3779B9)) * 0x85EBCA6B

with `bits` the element's bit pattern as an unsigned integer and i its row-major index, all
modulo 2**32. Integer sums wrap the same way in any order, so the value does not depend on
how the array is sharded or chunked. Arrays of 8-byte dtypes are not fingerprinted.

One hash, two places to compute it: `checksums` runs on the devices where the (sharded,
possibly multi-host) arrays live, inside one jit; `numpy_fingerprint` runs on a host array
a chunk at a time (converting a model must not hold a device copy of each array). Both
call `_mix`; a test pins that they agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_CHUNK = 1 << 20  # elements per NumPy step: a few MB of temporaries


def _mix(xp, bits_u32, index_u32):
    """The sum of the per-element hashes (see the module docstring), in array namespace
    `xp` (numpy or jax.numpy)."""
    h = (bits_u32 ^ (index_u32 * xp.uint32(0x9E3779B9))) * xp.uint32(0x85EBCA6B)
    return xp.sum(h ^ (h >> xp.uint32(13)), dtype=xp.uint32)


def _device_fingerprint(x: jax.Array) -> jax.Array:
    u = (x.astype(jnp.uint32) if x.dtype == jnp.bool_
         else jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32))
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1  # row-major index, without int64
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * np.uint32(stride)
        stride = (stride * x.shape[dim]) % 2**32
    return _mix(jnp, u, index)


_device_fingerprints = jax.jit(lambda leaves: [_device_fingerprint(x) for x in leaves])


def numpy_fingerprint(value: np.ndarray) -> int | None:
    """The fingerprint of a host array, a chunk at a time; None for 8-byte dtypes."""
    if value.dtype.itemsize not in _UINT:
        return None
    flat = np.ascontiguousarray(value).reshape(-1)
    bits = flat if flat.dtype == np.bool_ else flat.view(f"u{flat.dtype.itemsize}")
    total = 0
    for start in range(0, flat.size, _CHUNK):
        stop = min(start + _CHUNK, flat.size)
        index = np.arange(start, stop, dtype=np.uint64).astype(np.uint32)
        total = (total + int(_mix(np, bits[start:stop].astype(np.uint32), index))) % 2**32
    return total


def flat_names(tree: Any) -> dict[str, Any]:
    """`a/0/b`-named leaves; namedtuples and dicts name their fields as Orbax's metadata does."""
    def name(k):  # DictKey, GetAttrKey (namedtuple field), SequenceKey
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return {"/".join(name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checksums(tree: Any) -> dict[str, int]:
    """Fingerprints of the tree's arrays by `flat_names` name, computed where they live."""
    flat = {k: v for k, v in flat_names(tree).items()
            if hasattr(v, "dtype") and np.dtype(v.dtype).itemsize in _UINT}
    values = jax.device_get(_device_fingerprints(list(flat.values())))
    return dict(zip(flat, (int(v) for v in values)))


def digest(tree: Any) -> str:
    """A short hash of a whole tree's fingerprints: a resumed run checks with it that its
    frozen inputs (a fine-tuning base) are the ones it started from."""
    return hashlib.sha256(json.dumps(checksums(tree), sort_keys=True).encode()).hexdigest()[:16]
