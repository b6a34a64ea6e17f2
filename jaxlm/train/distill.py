"""Knowledge distillation: pretraining against a teacher run's predictions.

    jaxlm train --config configs/tiny.py --config.distill.teacher=runs/tiny \\
        --config.model.n_layers=2 --workdir runs/tiny-student

The student (the config's model) trains on the pretraining batches with

    loss = alpha x T^2 x KL(teacher_T || student_T) + (1 - alpha) x cross-entropy

per target token (the batch's loss weights: padding and, with packed documents, every
position whose target is in another document count nothing), where X_T = softmax(logits / T)
(Hinton et al. 2015; T^2 keeps the gradient's scale as T changes). The teacher (any decoder
run with the same tokenizer: a `jaxlm train` run, a pruned one, an imported Hugging Face
model; its own architecture and weight format) runs its forward pass in the same jitted
step, on the same mesh, as a frozen input: never trained, never checkpointed. Its weights
are recorded by fingerprint, and a resumed run reloads and checks them. Both models' logits
are made `optim.loss_block` positions at a time, as the cross-entropy's are.

Metrics: `loss` (the objective above), `ce_loss` and `kd_loss` (its two parts), per target
token. Evaluation (`jaxlm eval`, in-run) is the student's own cross-entropy.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.checkpoint import fingerprint, rundir
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.errors import ConfigError, UserError
from jaxlm.model import context, zoo
from jaxlm.parallel import rules
from jaxlm.train import state as state_lib
from jaxlm.train.lm import (
    CausalLM,
    blockwise_sums,
    cross_entropy_sums,
    loss_block,
    model_state_spec,
    token_metrics,
)
from jaxlm.train.step import Objective


class TeacherMismatchError(UserError):
    """The teacher is not the one the run started with, or cannot teach this student."""


def kd_sums(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, weights_BxL: jax.Array,
            temperature: float) -> jax.Array:
    """T^2 x sum over weighted positions of KL(softmax(teacher / T) || softmax(student / T))."""
    log_s = jax.nn.log_softmax(student_BxLxV / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_BxLxV / temperature, axis=-1)
    kl_BxL = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return temperature ** 2 * jnp.sum(kl_BxL * weights_BxL.astype(jnp.float32))


def distill_sums(graphdef: Any, params: Any, teacher_graphdef: Any, teacher_params: Any,
                 batch: dict, dist: ml_collections.ConfigDict, z_loss: float, block: int = 0
                 ) -> tuple[jax.Array, dict]:
    """The summed objective (module docstring; + z_loss x log(Z)^2 of the student) over the
    batch's weighted tokens, and its parts: ce_sum, kd_sum, z_sum, weight_sum."""
    model = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    x_BxLxD, t_BxLxD = model.hidden_states(*args), teacher.hidden_states(*args)
    shards = context.shards()
    size = loss_block(x_BxLxD.shape[1], model.cfg.vocab_size, block, shards)

    def one(x_BxCxD, t_BxCxD, targets_BxC, weights_BxC):
        logits = model.head_logits(x_BxCxD)
        sums = cross_entropy_sums(logits, {"targets": targets_BxC, "weights": weights_BxC},
                                  z_loss)[1]
        return {**sums, "kd_sum": kd_sums(logits, teacher.head_logits(t_BxCxD), weights_BxC,
                                          dist.temperature)}

    sums = blockwise_sums(one, (x_BxLxD, t_BxLxD, batch["targets"], batch["weights"]), size,
                          shards)
    objective = (dist.alpha * sums["kd_sum"] + (1.0 - dist.alpha) * sums["ce_sum"]
                 + z_loss * sums["z_sum"])
    return objective, sums


def distill_metrics(sums: dict, denom: jax.Array, alpha: float) -> dict:
    out = token_metrics(sums, denom)
    out["ce_loss"], out["kd_loss"] = out["loss"], sums["kd_sum"] / denom
    out["loss"] = alpha * out["kd_loss"] + (1.0 - alpha) * out["ce_loss"]
    return out


class Distill(CausalLM):
    """Causal-LM pretraining of the config's model against `distill.teacher`."""

    name = "distill"

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(cfg, workdir, **kwargs)
        self.name = "distill"
        self.teacher_dir = rundir.latest_step_dir(cfg.distill.teacher)
        teacher_cfg = rundir.config_of(rundir.read_metadata(self.teacher_dir), self.teacher_dir)
        self.teacher_model = teacher_cfg.model
        if zoo.family(self.teacher_model.family).kind != "decoder":
            raise ConfigError(f"config.distill.teacher: {self.teacher_dir} is a "
                              f"{self.teacher_model.family} run; a teacher is a decoder")
        if self.teacher_model.max_seq_len < self.cfg.data.seq_len:
            raise ConfigError(f"config.distill.teacher: {self.teacher_dir} holds "
                              f"{self.teacher_model.max_seq_len} positions (model.max_seq_len); "
                              f"data.seq_len is {self.cfg.data.seq_len}")
        teacher_tok = rundir.load_tokenizer(self.teacher_dir)
        mine = (self.tokenizer.name, self.cfg.model.vocab_size)
        theirs = (teacher_tok.name, self.teacher_model.vocab_size)
        if mine != theirs:
            raise ConfigError(f"config.distill.teacher: the teacher's tokenizer and vocabulary "
                              f"({theirs[0]}, {theirs[1]:,} rows) differ from the student's "
                              f"({mine[0]}, {mine[1]:,}); distillation compares their "
                              f"distributions token by token, so both must be the same")
        self.teacher_fingerprint = ""

    def state_spec(self, tx, mesh) -> state_lib.StateSpec:
        teacher_graphdef, teacher_state = nnx.split(zoo.abstract(self.teacher_model))
        self.teacher_graphdef = teacher_graphdef
        self.teacher_abstract = rules.abstract_of(teacher_state, mesh)
        self.graphdef, spec = model_state_spec(self.cfg.model, tx, mesh, self.cfg.train.seed,
                                               self.cfg.quant,
                                               frozen={"teacher": self.teacher_abstract})
        return spec

    def objective(self) -> Objective:
        graphdef, teacher_graphdef = self.graphdef, self.teacher_graphdef
        optim, dist = self.cfg.optim, self.cfg.distill

        def sums(trainable, frozen, batch, key, train):
            return distill_sums(graphdef, trainable["params"], teacher_graphdef,
                                frozen["teacher"], batch, dist,
                                optim.z_loss if train else 0.0, optim.loss_block)

        return Objective(sums, lambda s, denom: distill_metrics(s, denom, dist.alpha))

    def _teacher(self) -> Any:
        return checkpoint_lib.restore_params(self.teacher_dir, self.teacher_abstract)

    def init_state(self) -> state_lib.TrainState:
        state = super().init_state()
        teacher = self._teacher()
        self.teacher_fingerprint = fingerprint.digest(teacher)
        self.frozen = {"teacher": teacher}
        return state

    def resume(self, state: state_lib.TrainState, metadata: dict[str, Any]) -> state_lib.TrainState:
        """Reloads the teacher and checks it against the fingerprint the run recorded."""
        teacher = self._teacher()
        recorded = metadata.get("distill", {}).get("teacher_fingerprint")
        found = fingerprint.digest(teacher)
        if found != recorded:
            raise TeacherMismatchError(f"teacher {self.teacher_dir} does not match the one this "
                                       f"run started with (fingerprint {found} != {recorded})")
        self.teacher_fingerprint = recorded
        self.frozen = {"teacher": teacher}
        return state

    def metadata(self) -> dict[str, Any]:
        out = super().metadata()
        out["distill"] = {"teacher": str(self.teacher_dir),
                          "teacher_fingerprint": self.teacher_fingerprint}
        return out

    def describe(self) -> str:
        return (f"{super().describe()}; distilled from {self.teacher_dir} "
                f"({zoo.param_count(self.teacher_model):,} parameters, alpha "
                f"{self.cfg.distill.alpha}, temperature {self.cfg.distill.temperature})")

    def flops_per_token(self) -> float:
        """The student's training FLOPs and the teacher's forward pass (a third of its
        training FLOPs)."""
        return super().flops_per_token() + zoo.flops_per_token(
            self.teacher_model, self.cfg.data.seq_len) / 3
