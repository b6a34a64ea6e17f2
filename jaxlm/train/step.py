"""The train step: a pure function (state, batch) -> (state, metrics), jitted once.

Loss is cross-entropy averaged over real target tokens (weights 1), never padding.
With gradient accumulation the batch is split into microbatches whose *summed* losses and
gradients are added up and divided by the total weight once at the end, so accumulating
gives the same update as one large batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.train import optimizer as optimizer_lib
from jaxlm.train.state import StateSpec, TrainState, state_spec

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def loss_sums(graphdef: Any, params: Any, batch: Batch, z_loss: float) -> tuple[jax.Array, dict]:
    """Summed (not averaged) objective over the batch's weighted tokens, and its parts."""
    model = nnx.merge(graphdef, params)
    logits_BxLxV = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    weights_BxL = batch["weights"].astype(jnp.float32)
    ce_sum = jnp.sum((log_z_BxL - target_logit_BxL) * weights_BxL)
    z_sum = jnp.sum(jnp.square(log_z_BxL) * weights_BxL)
    objective = ce_sum + z_loss * z_sum
    return objective, {"ce_sum": ce_sum, "z_sum": z_sum, "weight_sum": jnp.sum(weights_BxL)}


def split_microbatches(batch: Batch, accum: int) -> Batch:
    """accum x (rows / accum) x ...: microbatch j takes rows j, j + accum, ..., so every
    device holds a share of each."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def apply_update(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                 sums: dict, nonfinite: str) -> tuple[Any, Any, jax.Array, jax.Array, jax.Array]:
    """Gradient sums -> mean over real targets -> optimizer update, keeping the last good
    parameters and moments when the loss or gradient is not finite (unless `nonfinite` is
    "continue"). Returns (params, opt_state, grad_norm, finite, denominator)."""
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(sums["ce_sum"]) & jnp.isfinite(grad_norm)
    if nonfinite != "continue":
        new_params, new_opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (new_params, new_opt_state), (params, opt_state))
    return new_params, new_opt_state, grad_norm, finite, denom


def make_train_step(optim_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, graphdef: Any, nonfinite: str = "continue") -> Callable:
    """`nonfinite` ("stop", "skip" or "continue"): what a step whose loss or gradient norm
    is not finite does to the state. "stop" and "skip" leave parameters and optimizer state
    unchanged (the loop stops, or goes on, when it next looks); "continue" applies the
    update. Every such step is counted in state["nonfinite_steps"], so the loop never needs a
    host sync per step to notice one."""
    accum = optim_cfg.grad_accum_steps
    z_loss = optim_cfg.z_loss
    grad_fn = jax.grad(lambda p, b: loss_sums(graphdef, p, b, z_loss), has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params = state["params"]
        if accum == 1:
            grads, sums = grad_fn(params, batch)
        else:
            micro = split_microbatches(batch, accum)

            def add_microbatch(carry, mb):
                grads, sums = grad_fn(params, mb)
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, (params, {"ce_sum": 0.0, "z_sum": 0.0, "weight_sum": 0.0}))
            (grads, sums), _ = jax.lax.scan(add_microbatch, zeros, micro)
        new_params, opt_state, grad_norm, finite, denom = apply_update(
            tx, params, state["opt_state"], grads, sums, nonfinite)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state,
                     "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32)}
        metrics = {
            "loss": sums["ce_sum"] / denom,
            "log_z_squared": sums["z_sum"] / denom,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "target_tokens": sums["weight_sum"],
        }
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, spec: StateSpec, mesh: Mesh) -> Callable:
    """Jit with explicit shardings; the old state's buffers are donated to the new one."""
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
    return jax.jit(train_step, in_shardings=(spec.shardings, batch_shardings),
                   out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Trainer:
    tx: optax.GradientTransformation
    spec: StateSpec
    step: Callable  # jitted (state, batch) -> (state, metrics), the state donated


def build_trainer(model_cfg: ml_collections.ConfigDict, optim_cfg: ml_collections.ConfigDict,
                  total_steps: int, mesh: Mesh, seed: int = 0, nonfinite: str = "continue") -> Trainer:
    """Optimizer, state layout and jitted step; call inside `jax.set_mesh(mesh)` and
    `sharding.axis_rules()`, as tracing applies the activation constraints."""
    tx = optimizer_lib.make_optimizer(optim_cfg, total_steps)
    schedule = optimizer_lib.learning_rate_schedule(optim_cfg, total_steps)
    spec = state_spec(model_cfg, tx, mesh, seed=seed)
    step = jit_train_step(make_train_step(optim_cfg, tx, schedule, spec.graphdef, nonfinite),
                          spec, mesh)
    return Trainer(tx, spec, step)


def abstract_batch(global_batch: int, seq_len: int, mesh: Mesh) -> Batch:
    """Shapes of one global batch, for ahead-of-time compilation."""
    s = sharding.batch_sharding(mesh)
    out = {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=s) for k in BATCH_KEYS}
    out["weights"] = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32, sharding=s)
    return out
