"""The device mesh and the logical-axis rules table: the one place model axes meet the mesh.

Model code names logical axes only (`("embed", "mlp")`); `RULES` maps each name to mesh
axes. Parameters use the plain names, activations the `act_*` names, so the two can be
sharded differently (FSDP shards weights over `fsdp` while activations stay whole along
`embed`). Axes reserved for later parallelism (`sequence`, `expert`, `stage`) get a rule
here when their mesh axis exists.

Across TPU slices (multi-slice), the mesh keeps these three axes: its data and fsdp axes
also span the slices (config mesh.dcn_data, mesh.dcn_fsdp), so "batch" still maps to
(data, fsdp) and model code is the same on one slice or many.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm import config as config_lib

MeshAxes = str | tuple[str, ...] | None

# Logical axis -> mesh axes. Order matters only for readability; names are unique.
RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("positions", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("sequence", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh from config over `devices` (default: all of JAX's).

    One slice: jax.make_mesh orders the devices by the physical topology so the innermost
    axis (tensor) gets the fastest links. Several slices (mesh.dcn_data x mesh.dcn_fsdp > 1):
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
        return jax.make_mesh(ici_sizes, config_lib.MESH_AXES, devices=devices,
                             axis_types=axis_types)
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
            raise config_lib.ConfigError(
                f"config.mesh.dcn_data: the devices form {len(by_slice)} TPU slice(s) but "
                f"mesh.dcn_data x mesh.dcn_fsdp = {num_slices}")
        return [by_slice[k] for k in sorted(by_slice)]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    size = len(ordered) // num_slices
    return [ordered[i * size:(i + 1) * size] for i in range(num_slices)]


def logical_to_spec(logical_axes: Sequence[str | None], rules=RULES) -> P:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in jaxlm.sharding.RULES")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def named_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf of an nnx state tree, from its logical axis names and RULES."""
    def to_sharding(v):
        return v.replace(NamedSharding(mesh, logical_to_spec(variable_axes(v))))
    return jax.tree.map(to_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def variable_axes(v: nnx.Variable) -> tuple:
    """A variable's logical axis names (None for each dimension when it has none)."""
    axes = v.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None,) * len(v.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of (batch, sequence) input arrays."""
    return NamedSharding(mesh, logical_to_spec(("batch", "sequence")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    if not flax_spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def axis_rules():
    """Context that makes `constrain` active (used together with `jax.set_mesh`)."""
    return nnx.logical_axis_rules(RULES)
