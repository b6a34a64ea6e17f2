"""The device mesh: built from the config's `mesh` section, one slice or several, and what
places host data and code on it.

Every mesh jaxlm builds comes from `make_mesh`, with the axes (data, fsdp, context, tensor,
expert); the logical names that model code uses map onto these axes in jaxlm.parallel.rules.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.parallel import rules


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, context, tensor, expert) mesh from config over `devices` (default:
    all of JAX's).

    One slice: jax.make_mesh orders the devices by the physical topology so the innermost
    axes (expert, tensor, then context: the all-to-alls and activation collectives) get the
    fastest links. Several slices (mesh.dcn_data x
    mesh.dcn_fsdp > 1):
    a hybrid mesh, each slice laid out as that same ICI mesh and the slices stacked along
    the data and fsdp axes, so only those axes' collectives cross the data-center network."""
    devices = list(devices if devices is not None else jax.devices())
    ici = config_lib.ici_mesh_shape(mesh_cfg, len(devices))
    ici_sizes = tuple(ici[a] for a in config_lib.MESH_AXES)
    dcn_sizes = tuple(mesh_cfg[config_lib.DCN_KEYS[a]] if a in config_lib.DCN_KEYS else 1
                      for a in config_lib.MESH_AXES)
    groups = slice_groups(devices, math.prod(dcn_sizes))
    # Auto axes: jit places what the shardings leave open.
    axis_types = (jax.sharding.AxisType.Auto,) * len(ici_sizes)
    if len(groups) == 1:
        try:
            return jax.make_mesh(ici_sizes, config_lib.MESH_AXES, devices=devices,
                                 axis_types=axis_types)
        except NotImplementedError:  # the TPU chip grid cannot be cut into these axes
            raise ConfigError(
                f"config.mesh: axes {dict(zip(config_lib.MESH_AXES, ici_sizes))} do not map "
                f"onto the slice's chip grid: each axis size must be a product of whole "
                f"physical axes (e.g. 4, 16 or 64 on a 4x4x4 v5p cube)") from None
    # As mesh_utils.create_hybrid_device_mesh, with slices also for devices that carry no
    # slice_index: slice s sits at position s of the (dcn_data, dcn_fsdp, 1) grid. As in
    # jax.make_mesh, a v5e/v6e slice may split a physical axis across two mesh axes.
    split = devices[0].device_kind in ("TPU v5 lite", "TPU v5e", "TPU v6 lite")
    blocks = [mesh_utils.create_device_mesh(ici_sizes, group, allow_split_physical_axes=split)
              for group in groups]
    grid = np.empty(dcn_sizes, dtype=object)
    for s, index in enumerate(np.ndindex(*dcn_sizes)):
        grid[index] = blocks[s]
    return Mesh(np.block(grid.tolist()), config_lib.MESH_AXES, axis_types=axis_types)


def slice_groups(devices: Sequence[jax.Device], num_slices: int) -> list[list[jax.Device]]:
    """The devices of each slice, in slice order.

    TPU devices name their slice (`slice_index`; absent means a single slice) and their
    count must match the config. Other devices have no slices: they are split into
    `num_slices` equal runs in (process, id) order: on GPU hosts slices follow host
    boundaries when the counts allow, and simulated CPU devices rehearse a multi-slice mesh."""
    if devices[0].platform == "tpu":
        by_slice: dict[int, list[jax.Device]] = {}
        for d in devices:
            by_slice.setdefault(getattr(d, "slice_index", 0), []).append(d)
        if len(by_slice) != num_slices:
            raise ConfigError(
                f"config.mesh.dcn_data: the devices form {len(by_slice)} TPU slice(s) but "
                f"mesh.dcn_data x mesh.dcn_fsdp = {num_slices}")
        return [by_slice[k] for k in sorted(by_slice)]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    size = len(ordered) // num_slices
    return [ordered[i * size:(i + 1) * size] for i in range(num_slices)]


def single_device_mesh() -> Mesh:
    """The default mesh over the first device alone (tools that read one checkpoint)."""
    return make_mesh(config_lib.defaults().mesh, jax.devices()[:1])


def fit_mesh(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `cfg` whose mesh fits this host's devices: the run's own mesh, or (when it
    does not fit, e.g. a pod run read on a laptop) fsdp over every device, with a note."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    try:
        config_lib.mesh_shape(cfg.mesh, jax.device_count())
    except ConfigError as e:
        print(f"note: {e}; using mesh fsdp={jax.device_count()} instead "
              f"(set --config.mesh.* to choose)", file=sys.stderr)
        cfg.mesh = config_lib.defaults().mesh
    return cfg


def batch_shards(mesh: Mesh) -> int:
    """How many ways the mesh splits the batch axis (rows are padded to a multiple)."""
    axes = rules.logical_to_spec(("batch",))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


@contextlib.contextmanager
def use(mesh: Mesh) -> Iterator[Mesh]:
    """The mesh and the logical-axis rules, active together: jit traces under it apply the
    activation constraints of jaxlm.parallel.rules.constrain."""
    with jax.set_mesh(mesh), rules.axis_rules():
        yield mesh


def to_global(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """Each process contributes its own rows; each result is one array sharded over the
    mesh as `shardings[key]` says (rows first)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def to_global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """`to_global` of (batch, sequence) arrays, rows sharded over the batch axes."""
    s = rules.batch_sharding(mesh)
    return to_global(local, {k: s for k in local})
