"""The fine-tuning state: what trains, what stays frozen, and how both are sharded.

    state  = {"step", <trainable groups>, "opt_state", "nonfinite_steps"}   (checkpointed)
    frozen = {"params": base parameters}  (LoRA only; read from the base, never saved)

Trainable groups by method: full: "params" (every model parameter, so a full run's checkpoint
is a model checkpoint `jaxlm generate` and `init_from` read); lora: "adapters" (the LoraParam
leaves only). Classification adds "head". Every leaf carries the logical axes of its
variable, so the state is created and restored sharded on any mesh, as in pretraining.
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
from jaxlm.finetune import classify, lora, options
from jaxlm.model.transformer import Transformer


def build_model(model_cfg: ml_collections.ConfigDict, ft_cfg: ml_collections.ConfigDict,
                seed: int, train: bool = True) -> Transformer:
    """The model with adapters attached when the method is LoRA (without dropout unless
    `train`)."""
    with nnx.use_eager_sharding(False):
        model = Transformer(model_cfg, nnx.Rngs(params=seed))
    if ft_cfg.method == "lora":
        lora.attach(model, ft_cfg.lora, seed, train=train)
    return model


def _pure(state: nnx.State) -> Any:
    return nnx.to_pure_dict(state)


def _axes(state: nnx.State) -> Any:
    return _pure(jax.tree.map(lambda v: v.replace(sharding.variable_axes(v)), state,
                              is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _shardings(state: nnx.State, mesh: Mesh) -> Any:
    return _pure(sharding.named_shardings(state, mesh))


def _head_shardings(mesh: Mesh) -> dict:
    return {k: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes))
            for k, axes in classify.HEAD_AXES.items()}


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    graphdef: Any  # the train model's structure (adapters with dropout)
    eval_graphdef: Any  # the same without dropout
    groups: tuple[str, ...]  # trainable groups, in the state
    shardings: dict  # of the state
    abstract: dict  # ShapeDtypeStructs of the state, with shardings
    frozen_shardings: dict
    frozen_abstract: dict
    base_abstract: Any  # the base model's parameters (what a base checkpoint holds)
    axes: dict  # logical axes of the trainable groups (checkpoint metadata)
    base_axes: Any  # logical axes of the base model's parameters
    key_template: Any  # LoraKey leaves (dropout keys), or None


def spec(model_cfg: ml_collections.ConfigDict, ft_cfg: ml_collections.ConfigDict,
         tx: optax.GradientTransformation, mesh: Mesh, seed: int) -> FinetuneSpec:
    """Shapes, shardings and graphdefs, without allocating anything."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, ft_cfg, seed))
    graphdef, _ = nnx.split(model)
    eval_graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, ft_cfg, seed,
                                                                     train=False)))
    base_state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.LoraParam)))
    base = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        _pure(base_state), _shardings(base_state, mesh))
    shardings: dict = {}
    axes: dict = {}
    frozen_shardings: dict = {}
    key_template = None
    if ft_cfg.method == "lora":
        adapters = nnx.state(model, lora.LoraParam)
        shardings["adapters"], axes["adapters"] = _shardings(adapters, mesh), _axes(adapters)
        frozen_shardings["params"] = _shardings(base_state, mesh)
        keys = _pure(nnx.state(model, lora.LoraKey))  # dropout: drawn inside the step
        key_template = keys if jax.tree.leaves(keys) else None
    else:
        shardings["params"], axes["params"] = _shardings(base_state, mesh), _axes(base_state)
    shapes = {}
    if ft_cfg.method == "lora":
        shapes["adapters"] = _pure(nnx.state(model, lora.LoraParam))
    else:
        shapes["params"] = _pure(base_state)
    if ft_cfg.task == "classify":
        c = options.num_labels(ft_cfg)
        shapes["head"] = {"w": jax.ShapeDtypeStruct((model_cfg.d_model, c), jnp.float32),
                          "b": jax.ShapeDtypeStruct((c,), jnp.float32)}
        shardings["head"], axes["head"] = _head_shardings(mesh), dict(classify.HEAD_AXES)
    groups = tuple(shapes)
    abstract_opt = jax.eval_shape(tx.init, shapes)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, {g: shardings[g] for g in groups},
        transform_non_params=lambda _: sharding.replicated(mesh))
    replicated = sharding.replicated(mesh)
    full_shardings = {"step": replicated, **shardings, "opt_state": opt_shardings,
                      "nonfinite_steps": replicated}
    full_shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), **shapes,
                   "opt_state": abstract_opt,
                   "nonfinite_steps": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            full_shapes, full_shardings)
    frozen_abstract = {"params": base} if ft_cfg.method == "lora" else {}
    return FinetuneSpec(graphdef, eval_graphdef, groups, full_shardings, abstract,
                        frozen_shardings, frozen_abstract, base, axes, _axes(base_state),
                        key_template)


def init_state(model_cfg: ml_collections.ConfigDict, ft_cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, fs: FinetuneSpec, base_params: Any,
               seed: int) -> dict:
    """A fresh state: the base's parameters (full) or new adapters (LoRA), a new head
    (classification), a fresh optimizer, step 0. Built inside one jit with sharded outputs."""
    def init(base):
        groups: dict = {}
        if ft_cfg.method == "lora":
            model = build_model(model_cfg, ft_cfg, seed)
            groups["adapters"] = _pure(nnx.state(model, lora.LoraParam))
        else:
            groups["params"] = base
        if ft_cfg.task == "classify":
            groups["head"] = classify.init_head(jax.random.fold_in(jax.random.key(seed), 1),
                                                model_cfg.d_model, options.num_labels(ft_cfg),
                                                model_cfg.init_std)
        return {"step": jnp.zeros((), jnp.int32), **groups, "opt_state": tx.init(groups),
                "nonfinite_steps": jnp.zeros((), jnp.int32)}

    # Full fine-tuning: the base's buffers become the state's (donated, not copied).
    donate = (0,) if ft_cfg.method == "full" else ()
    return jax.jit(init, out_shardings=fs.shardings, donate_argnums=donate)(base_params)
