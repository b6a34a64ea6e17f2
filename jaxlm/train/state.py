"""The train state of any task, created directly sharded on the mesh.

    state  = {"step", <trainable groups>, "opt_state", "nonfinite_steps"}   (checkpointed)
    frozen = {<inputs the step reads but never updates>}                    (not saved)

A task names its trainable groups: pretraining trains "params" (the model's parameter tree
as nested dicts of arrays, what Orbax saves and optax updates); LoRA trains "adapters" with
the base parameters frozen; a classifier adds "head". `nonfinite_steps` counts steps whose
loss or gradients were not finite. Every leaf carries the logical axes of its variable, so
a state is created and restored sharded on any mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm.parallel import rules

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What the step, the checkpointer and the loop need to know about a task's state."""

    groups: tuple[str, ...]  # the trainable groups, in the state
    abstract: TrainState  # ShapeDtypeStruct per leaf, with its sharding
    shardings: TrainState  # NamedSharding per leaf
    axes: dict[str, Any]  # logical axis names of each trainable group's leaves
    frozen_abstract: dict[str, Any] = dataclasses.field(default_factory=dict)
    frozen_shardings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def trainable_count(self) -> int:
        return sum(int(x.size) for g in self.groups for x in jax.tree.leaves(self.abstract[g]))


def make_spec(trainable: dict[str, Any], axes: dict[str, Any], tx: optax.GradientTransformation,
              mesh: Mesh, frozen: dict[str, Any] | None = None) -> StateSpec:
    """The state layout from each trainable group's ShapeDtypeStructs (with shardings) and
    logical axes; the optimizer state takes each parameter's sharding. Allocates nothing."""
    groups = tuple(trainable)
    param_shardings = {g: jax.tree.map(lambda a: a.sharding, trainable[g]) for g in groups}
    abstract_opt = jax.eval_shape(tx.init, trainable)
    replicated = rules.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated)
    shardings = {"step": replicated, **param_shardings, "opt_state": opt_shardings,
                 "nonfinite_steps": replicated}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), **trainable, "opt_state": abstract_opt,
              "nonfinite_steps": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    frozen = frozen or {}
    return StateSpec(groups, abstract, shardings, axes, frozen,
                     jax.tree.map(lambda a: a.sharding, frozen))


def init_state(spec: StateSpec, tx: optax.GradientTransformation,
               make_groups: Callable[..., dict[str, Any]], *args: Any,
               donate: bool = False) -> TrainState:
    """A fresh state (step 0, fresh optimizer) around `make_groups(*args)`, the trainable
    groups' initial values, inside one jit whose outputs are sharded: every device computes
    only its own shards, nothing is materialised whole. `donate`: the arguments' buffers
    become the state's (full fine-tuning starts from the base's arrays, not a copy)."""
    def init(*args) -> TrainState:
        groups = make_groups(*args)
        return {"step": jnp.zeros((), jnp.int32), **groups, "opt_state": tx.init(groups),
                "nonfinite_steps": jnp.zeros((), jnp.int32)}
    donate_argnums = tuple(range(len(args))) if donate else ()
    return jax.jit(init, out_shardings=spec.shardings, donate_argnums=donate_argnums)(*args)
