"""The train step of every task: a pure function (state, frozen, batch) -> (state, metrics),
jitted once with explicit shardings and the state donated.

A task supplies its objective as an `Objective`: summed (not averaged) quantities over the
batch's weighted targets, "ce_sum" and "weight_sum" among them. The step takes gradients
with respect to the trainable groups only (frozen inputs enter as constants, so neither
their gradients nor their weight-gradient matmuls are computed), divided by the total
weight, and applies the optimizer. Without accumulation the division seeds the backward
pass (its cotangent is 1 / weight), so no pass over the parameters divides them; with
gradient accumulation the batch is split into microbatches whose sums and gradients are
added up before one division, so accumulating gives the same update as one large batch.

Randomness inside the objective (dropout) draws from fold_in(seed, step) (and the
microbatch index): a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxlm.parallel import rules
from jaxlm.train.state import StateSpec, TrainState

Batch = dict[str, jax.Array]
# (trainable groups, frozen inputs, batch, PRNG key, training?) -> (objective, sums)
SumsFn = Callable[[dict, dict, Batch, jax.Array, bool], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a task optimises: `sums` (see SumsFn) and the metrics it reports from them
    (`metrics(sums, denominator)`, the denominator being max(weight_sum, 1))."""

    sums: SumsFn
    metrics: Callable[[dict, jax.Array], dict]


def split_microbatches(batch: Batch, accum: int) -> Batch:
    """accum x (rows / accum) x ...: microbatch j takes rows j, j + accum, ..., so every
    device holds a share of each."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def denominator(sums: dict) -> jax.Array:
    """What the summed gradients and metrics are divided by: the weight of the batch's
    real targets (at least 1)."""
    return jnp.maximum(sums["weight_sum"], 1.0)


def apply_update(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                 sums: dict, nonfinite: str) -> tuple[Any, Any, jax.Array, jax.Array]:
    """Mean gradients over real targets -> optimizer update, keeping the last good
    parameters and moments when the loss or gradient is not finite (unless `nonfinite` is
    "continue"). Returns (params, opt_state, grad_norm, finite)."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(sums["ce_sum"]) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    if nonfinite == "continue":
        new_params, new_opt_state = update(params, opt_state)
    else:  # a branch, not a select: the update runs in place, old values are not copied
        new_params, new_opt_state = jax.lax.cond(finite, update, lambda *old: old, params,
                                                 opt_state)
    return new_params, new_opt_state, grad_norm, finite


def make_train_step(objective: Objective, groups: tuple[str, ...],
                    optim_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int = 0, nonfinite: str = "continue"
                    ) -> Callable[[TrainState, dict, Batch], tuple[TrainState, dict]]:
    """`nonfinite` ("stop", "skip" or "continue"): what a step whose loss or gradient norm
    is not finite does to the state. "stop" and "skip" leave the trainable groups and the
    optimizer state unchanged (the loop stops, or goes on, when it next looks); "continue"
    applies the update. Every such step is counted in state["nonfinite_steps"], so the loop
    never needs a host sync per step to notice one."""
    accum = optim_cfg.grad_accum_steps

    def grad_fn(trainable, frozen, batch, key, mean: bool):
        """(gradients, sums) of the objective: summed over the batch, or its mean when
        `mean` (the backward pass seeded with 1 / the batch's denominator)."""
        objective_value, backward, sums = jax.vjp(
            lambda t: objective.sums(t, frozen, batch, key, True), trainable, has_aux=True)
        seed = 1.0 / denominator(sums) if mean else 1.0
        return backward(jnp.asarray(seed, objective_value.dtype))[0], sums

    def train_step(state: TrainState, frozen: dict, batch: Batch) -> tuple[TrainState, dict]:
        trainable = {g: state[g] for g in groups}
        step_key = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
        if accum == 1:
            grads, sums = grad_fn(trainable, frozen, batch, step_key, mean=True)
        else:
            micro = split_microbatches(batch, accum)

            def add_microbatch(carry, inputs):
                j, mb = inputs
                out = grad_fn(trainable, frozen, mb, jax.random.fold_in(step_key, j), False)
                return jax.tree.map(jnp.add, carry, out), None

            shapes = jax.eval_shape(functools.partial(grad_fn, mean=False), trainable, frozen,
                                    jax.tree.map(lambda x: x[0], micro), step_key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, sums), _ = jax.lax.scan(add_microbatch, zeros, (jnp.arange(accum), micro))
        denom = denominator(sums)
        if accum > 1:
            grads = jax.tree.map(lambda g: g / denom, grads)
        new, opt_state, grad_norm, finite = apply_update(
            tx, trainable, state["opt_state"], grads, sums, nonfinite)
        new_state = {"step": state["step"] + 1, **new, "opt_state": opt_state,
                     "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32)}
        metrics = {**objective.metrics(sums, denom), "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"])}
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, spec: StateSpec, batch_shardings: dict,
                   mesh: Mesh) -> Callable:
    """Jit with explicit shardings; the old state's buffers are donated to the new one."""
    return jax.jit(train_step, in_shardings=(spec.shardings, spec.frozen_shardings,
                                             batch_shardings),
                   out_shardings=(spec.shardings, rules.replicated(mesh)), donate_argnums=0)


def jit_eval_sums(objective: Objective, spec: StateSpec, batch_shardings: dict,
                  mesh: Mesh) -> Callable:
    """Jitted (trainable groups, frozen, batch) -> the batch's sums, no dropout."""
    def eval_sums(trainable, frozen, batch):
        return objective.sums(trainable, frozen, batch, jax.random.PRNGKey(0), False)[1]

    trainable_shardings = {g: spec.shardings[g] for g in spec.groups}
    return jax.jit(eval_sums, in_shardings=(trainable_shardings, spec.frozen_shardings,
                                            batch_shardings),
                   out_shardings=rules.replicated(mesh))
