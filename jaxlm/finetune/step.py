"""Fine-tuning train and eval steps: pure functions, jitted once with explicit shardings.

    train_step(state, frozen, batch) -> (state, metrics)     (the state donated)
    eval_step(trainable, frozen, batch) -> sums               (summed, for exact averages)

SFT uses the pretraining loss (`train.step.loss_sums`: summed cross-entropy over weighted
targets; the SFT rows put weight only on response tokens). Classification uses
`classify.loss_sums`. Gradients are taken with respect to the trainable groups only: with
LoRA the base enters the model as a constant, so neither its gradient nor its weight-gradient
matmuls are computed and the optimizer never touches it. Gradient accumulation and the
non-finite policy behave as in pretraining (train/step.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from jaxlm import sharding
from jaxlm.finetune import classify, lora
from jaxlm.finetune.state import FinetuneSpec
from jaxlm.train import step as step_lib

SUM_KEYS = {"sft": ("ce_sum", "z_sum", "weight_sum"),
            "classify": ("ce_sum", "correct_sum", "weight_sum")}


def batch_shardings(task: str, mesh: Mesh) -> dict[str, NamedSharding]:
    rows = sharding.batch_sharding(mesh)
    if task == "sft":
        return {k: rows for k in step_lib.BATCH_KEYS}
    per_row = NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
    return {"inputs": rows, "positions": rows, "segment_ids": rows,
            **{k: per_row for k in classify.ROW_KEYS}}


def abstract_batch(task: str, global_batch: int, seq_len: int, mesh: Mesh) -> dict:
    out = {}
    for key, s in batch_shardings(task, mesh).items():
        shape = (global_batch,) if key in classify.ROW_KEYS else (global_batch, seq_len)
        dtype = jnp.float32 if key in ("weights", "label_weights") else jnp.int32
        out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    return out


def make_sums_fn(fs: FinetuneSpec, ft_cfg: ml_collections.ConfigDict, z_loss: float,
                 train: bool) -> Callable:
    """(trainable, frozen, batch, key) -> (objective, sums) for the task and method."""
    graphdef = fs.graphdef if train else fs.eval_graphdef
    use_keys = train and fs.key_template is not None

    def sums_fn(trainable: dict, frozen: dict, batch: dict, key: jax.Array):
        if ft_cfg.method == "lora":
            parts = [jax.lax.stop_gradient(frozen["params"]), trainable["adapters"]]
            if use_keys:
                parts.append(lora.dropout_keys(fs.key_template, key))
            params = lora.combine(*parts)
        else:
            params = trainable["params"]
        if ft_cfg.task == "sft":
            return step_lib.loss_sums(graphdef, params, batch, z_loss)
        return classify.loss_sums(graphdef, params, trainable["head"], batch, ft_cfg.pooling)

    return sums_fn


def make_train_step(fs: FinetuneSpec, ft_cfg: ml_collections.ConfigDict,
                    optim_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int, nonfinite: str = "continue") -> Callable:
    accum = optim_cfg.grad_accum_steps
    grad_fn = jax.grad(make_sums_fn(fs, ft_cfg, optim_cfg.z_loss, train=True), has_aux=True)
    sum_keys = SUM_KEYS[ft_cfg.task]

    def train_step(state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
        trainable = {g: state[g] for g in fs.groups}
        # Dropout randomness is a function of (seed, step): a resumed run draws the same.
        step_key = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
        if accum == 1:
            grads, sums = grad_fn(trainable, frozen, batch, step_key)
        else:  # microbatch j takes rows j, j + accum, ... (as in pretraining)
            micro = step_lib.split_microbatches(batch, accum)

            def add_microbatch(carry, inputs):
                j, mb = inputs
                out = grad_fn(trainable, frozen, mb, jax.random.fold_in(step_key, j))
                return jax.tree.map(jnp.add, carry, out), None

            zeros = jax.tree.map(jnp.zeros_like, (trainable, dict.fromkeys(sum_keys, 0.0)))
            (grads, sums), _ = jax.lax.scan(add_microbatch, zeros, (jnp.arange(accum), micro))
        new, opt_state, grad_norm, finite, denom = step_lib.apply_update(
            tx, trainable, state["opt_state"], grads, sums, nonfinite)
        new_state = {"step": state["step"] + 1, **new, "opt_state": opt_state,
                     "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": sums["ce_sum"] / denom, "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"])}
        if ft_cfg.task == "sft":
            metrics["target_tokens"] = sums["weight_sum"]
        else:
            metrics["accuracy"] = sums["correct_sum"] / denom
            metrics["examples"] = sums["weight_sum"]
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, fs: FinetuneSpec, task: str, mesh: Mesh) -> Callable:
    return jax.jit(train_step, in_shardings=(fs.shardings, fs.frozen_shardings,
                                             batch_shardings(task, mesh)),
                   out_shardings=(fs.shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(fs: FinetuneSpec, ft_cfg: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """Jitted (trainable, frozen, batch) -> the batch's sums (no dropout)."""
    sums_fn = make_sums_fn(fs, ft_cfg, 0.0, train=False)

    def eval_step(trainable, frozen, batch):
        return sums_fn(trainable, frozen, batch, jax.random.PRNGKey(0))[1]

    trainable_shardings = {g: fs.shardings[g] for g in fs.groups}
    return jax.jit(eval_step, in_shardings=(trainable_shardings, fs.frozen_shardings,
                                            batch_shardings(ft_cfg.task, mesh)),
                   out_shardings=sharding.replicated(mesh))
