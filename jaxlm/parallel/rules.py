"""The logical-axis rules table: the one place model axes meet the mesh axes.

Model code names logical axes only (`("embed", "mlp")`); `RULES` maps each name to mesh
axes. Parameters use the plain names, activations the `act_*` names, so the two can be
sharded differently (FSDP shards weights over `fsdp` while activations stay whole along
`embed`). The sequence of activations (`act_sequence`) is split over `context` (context
parallelism); the batch's and the caches' (`sequence`) stay whole. The `expert` axis holds
the mixture-of-experts weights' experts (jaxlm/model/moe.py exchanges tokens over it) and
splits the batch everywhere else, as data does.

Across TPU slices (multi-slice), the mesh keeps these axes: its data and fsdp axes
also span the slices (config mesh.dcn_data, mesh.dcn_fsdp), so "batch" still maps to
(data, fsdp) and model code is the same on one slice or many.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
    ("expert", "expert"),  # mixture-of-experts weights: each device holds its experts
    ("experts_router", None),  # the router's expert columns: every device routes every token
    ("positions", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("batch", config_lib.BATCH_AXES),  # data, fsdp and expert (data parallel outside experts)
    ("sequence", None),  # inputs, caches: whole rows (each device of a context group reads them)
    ("act_sequence", "context"),  # activations: split over the context axis
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def logical_to_spec(logical_axes: Sequence[str | None], rules=RULES) -> P:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in jaxlm.parallel.rules.RULES")
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


def platform() -> str:
    """The platform of the mesh in context (`jax.set_mesh`, inside a trace too), else JAX's
    default backend: "tpu" also when compiling for a TPU topology on a CPU host."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes logical axis `name` maps to (collectives inside shard_map name them)."""
    axes = logical_to_spec((name,))[0]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def logical_size(name: str) -> int:
    """How many ways the mesh in context splits logical axis `name` (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(math.prod(mesh.shape[a] for a in mesh_axes(name)))


def shard_map(f, in_axes: Sequence[Sequence[str | None] | None],
              out_axes: Sequence[str | None], check_vma: bool = False):
    """`f` mapped over the shards of the mesh in context (jax.shard_map), each argument split
    along its logical axes (None: an argument that is not an array); `f` itself outside a
    mesh. For kernels XLA cannot partition (Pallas) and explicit collectives (`check_vma`:
    JAX tracks which values vary across devices, so that a psum's gradient is right)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return f
    specs = tuple(None if axes is None else logical_to_spec(axes) for axes in in_axes)
    return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=logical_to_spec(out_axes),
                         check_vma=check_vma)


def axis_rules():
    """Context that makes `constrain` active (used together with `jax.set_mesh`)."""
    return nnx.logical_axis_rules(RULES)


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def axes_of(state: nnx.State) -> Any:
    """Each variable's logical axis names, as a nested dict of tuples (checkpoint metadata)."""
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(variable_axes(v)), state,
                                         is_leaf=is_variable))


def shardings_of(state: nnx.State, mesh: Mesh) -> Any:
    """Each variable's NamedSharding on `mesh` from RULES, as a nested dict."""
    return nnx.to_pure_dict(named_shardings(state, mesh))


def abstract_of(state: nnx.State, mesh: Mesh) -> Any:
    """ShapeDtypeStructs carrying their shardings on `mesh`, as a nested dict: what a jit's
    output shardings and a sharded restore take."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(state), shardings_of(state, mesh))
