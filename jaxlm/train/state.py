"""The train state, created directly sharded on the mesh.

The state is a plain pytree `{"step", "params", "opt_state", "nonfinite_steps"}` (the last
counts steps whose loss or gradients were not finite); `params` is the model's
parameter tree as nested dicts of arrays (what Orbax saves and optax updates). The model's
structure lives in its `graphdef`; `nnx.merge(graphdef, params)` rebuilds the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.model.transformer import Transformer

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What the step and the checkpointer need to know about the state."""

    graphdef: Any  # the model's structure, without arrays
    shardings: TrainState  # NamedSharding per leaf
    abstract: TrainState  # ShapeDtypeStruct per leaf, with its sharding
    param_axes: Any  # logical axis names per parameter


def _build_model(model_cfg: ml_collections.ConfigDict, seed: int) -> Transformer:
    with nnx.use_eager_sharding(False):  # shardings are applied by jit below, from RULES
        return Transformer(model_cfg, nnx.Rngs(params=seed))


def state_spec(model_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               mesh: Mesh, seed: int = 0) -> StateSpec:
    """Shapes, shardings and graphdef of the train state, without allocating it."""
    abstract_model = nnx.eval_shape(lambda: _build_model(model_cfg, seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = nnx.to_pure_dict(sharding.named_shardings(abstract_params, mesh))
    param_axes = nnx.to_pure_dict(jax.tree.map(
        lambda v: v.replace(sharding.variable_axes(v)), abstract_params,
        is_leaf=lambda x: isinstance(x, nnx.Variable)))
    abstract_params = nnx.to_pure_dict(abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh))
    shardings = {"step": sharding.replicated(mesh), "params": param_shardings,
                 "opt_state": opt_shardings, "nonfinite_steps": sharding.replicated(mesh)}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
              "opt_state": abstract_opt, "nonfinite_steps": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    return StateSpec(graphdef, shardings, abstract, param_axes)


def init_state(model_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               spec: StateSpec, seed: int = 0) -> TrainState:
    """Initialises parameters and optimizer state inside one jit whose outputs are sharded:
    every device computes only its own shards, nothing is materialised whole."""
    def init() -> TrainState:
        _, params = nnx.split(_build_model(model_cfg, seed))
        params = nnx.to_pure_dict(params)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "nonfinite_steps": jnp.zeros((), jnp.int32)}
    return jax.jit(init, out_shardings=spec.shardings)()
