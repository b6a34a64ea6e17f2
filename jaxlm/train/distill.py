"""Knowledge distillation: training against a teacher run's predictions.

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

Offline (`CachedDistill`, distill.cache): the teacher's top-k logits of every training
batch, written once by `jaxlm distill cache` (jaxlm.compress.distill_cache) and read with
the batches (jaxlm.data.teacher_cache); the KL term renormalises the teacher over its k
tokens (k = the vocabulary: the online loss). Encoder-decoder students (span corruption:
`SpanCorruptionDistill`) take an encoder-decoder teacher, the KL over the decoder's targets
(`seq2seq_distill_sums`). Fine-tuning (jaxlm.finetune.tasks, finetune.task 'sft' or
'seq2seq') takes a `Teacher` and `teacher_sums` of its kind as its training objective.

Metrics: `loss` (the objective above), `ce_loss` and `kd_loss` (its two parts), per target
token. Evaluation (`jaxlm eval`, in-run) is the student's own cross-entropy.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from jaxlm.checkpoint import fingerprint, rundir
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.data import pipeline, teacher_cache
from jaxlm.errors import ConfigError, UserError
from jaxlm.model import context, zoo
from jaxlm.parallel import rules
from jaxlm.train import seq2seq as seq2seq_train
from jaxlm.train import state as state_lib
from jaxlm.train.lm import (
    CausalLM,
    blockwise_map,
    blockwise_sums,
    cross_entropy_sums,
    hidden_and_routing,
    loss_block,
    model_state_spec,
    token_metrics,
    with_routing,
)
from jaxlm.train.seq2seq import SpanCorruption
from jaxlm.train.step import Objective
from jaxlm.train.task import Batches, BatchLayout


class TeacherMismatchError(UserError):
    """The teacher is not the one the run started with, or cannot teach this student."""


def kd_sums(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, weights_BxL: jax.Array,
            temperature: float) -> jax.Array:
    """T^2 x sum over weighted positions of KL(softmax(teacher / T) || softmax(student / T))."""
    log_s = jax.nn.log_softmax(student_BxLxV / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_BxLxV / temperature, axis=-1)
    kl_BxL = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return temperature ** 2 * jnp.sum(kl_BxL * weights_BxL.astype(jnp.float32))


def kd_topk_sums(student_BxLxV: jax.Array, logits_BxLxK: jax.Array, ids_BxLxK: jax.Array,
                 weights_BxL: jax.Array, temperature: float) -> jax.Array:
    """kd_sums against a cached teacher: its k largest logits and their ids, the teacher's
    distribution renormalised over those k tokens (with k = the vocabulary, kd_sums)."""
    log_s = jax.nn.log_softmax(student_BxLxV / temperature, axis=-1)
    log_s_BxLxK = jnp.take_along_axis(log_s, ids_BxLxK, axis=-1)
    log_t = jax.nn.log_softmax(logits_BxLxK / temperature, axis=-1)
    kl_BxL = jnp.sum(jnp.exp(log_t) * (log_t - log_s_BxLxK), axis=-1)
    return temperature ** 2 * jnp.sum(kl_BxL * weights_BxL.astype(jnp.float32))


def _taught_sums(model, x_BxLxD: jax.Array, teacher: tuple[jax.Array, ...], kd, batch: dict,
                 dist: ml_collections.ConfigDict, z_loss: float, block: int
                 ) -> tuple[jax.Array, dict]:
    """The objective over the student's hidden states and the teacher's arrays (B x L x ...),
    blockwise; kd(student logits, weights, *teacher arrays of the block) -> kd_sum."""
    shards = context.shards()
    size = loss_block(x_BxLxD.shape[1], model.cfg.vocab_size, block, shards)

    def one(x_BxCxD, targets_BxC, weights_BxC, *teacher_BxC):
        logits = model.head_logits(x_BxCxD)
        sums = cross_entropy_sums(logits, {"targets": targets_BxC, "weights": weights_BxC},
                                  z_loss)[1]
        return {**sums, "kd_sum": kd(logits, weights_BxC, *teacher_BxC)}

    sums = blockwise_sums(one, (x_BxLxD, batch["targets"], batch["weights"], *teacher), size,
                          shards)
    return _mixed(sums, dist, z_loss), sums


def _mixed(sums: dict, dist: ml_collections.ConfigDict, z_loss: float) -> jax.Array:
    return (dist.alpha * sums["kd_sum"] + (1.0 - dist.alpha) * sums["ce_sum"]
            + z_loss * sums["z_sum"])


def _inputs(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    return batch["inputs"], batch["positions"], batch["segment_ids"]


def distill_sums(graphdef: Any, params: Any, teacher_graphdef: Any, teacher_params: Any,
                 batch: dict, dist: ml_collections.ConfigDict, z_loss: float, block: int = 0,
                 routing: tuple[float, float] = (0.0, 0.0)) -> tuple[jax.Array, dict]:
    """The summed objective (module docstring; + z_loss x log(Z)^2 of the student) over the
    batch's weighted tokens, and its parts: ce_sum, kd_sum, z_sum, weight_sum; a
    mixture-of-experts student adds its routers' losses (`routing`: lm.with_routing)."""
    model = nnx.merge(graphdef, params)
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    t_BxLxD = teacher.hidden_states(*_inputs(batch))

    def kd(logits, weights, t_BxCxD):
        return kd_sums(logits, teacher.head_logits(t_BxCxD), weights, dist.temperature)

    x_BxLxD, figures = hidden_and_routing(model, batch)
    return with_routing(*_taught_sums(model, x_BxLxD, (t_BxLxD,), kd, batch, dist, z_loss, block),
                        figures, *routing)


def seq2seq_distill_sums(graphdef: Any, params: Any, teacher_graphdef: Any,
                         teacher_params: Any, batch: dict, dist: ml_collections.ConfigDict,
                         z_loss: float, block: int = 0) -> tuple[jax.Array, dict]:
    """distill_sums of an encoder-decoder student and teacher over the decoder's targets
    (teacher-forced row pairs: span corruption, seq2seq fine-tuning); their logits whole, as
    the student's own loss makes them (`block` is not used)."""
    logits_BxTxV = seq2seq_train.logits(graphdef, params, batch)
    teacher_BxTxV = seq2seq_train.logits(teacher_graphdef, jax.lax.stop_gradient(teacher_params),
                                         batch)
    sums = cross_entropy_sums(logits_BxTxV, batch, z_loss)[1]
    sums["kd_sum"] = kd_sums(logits_BxTxV, teacher_BxTxV, batch["weights"], dist.temperature)
    return _mixed(sums, dist, z_loss), sums


def teacher_sums(kind: str, optim: ml_collections.ConfigDict):
    """The taught objective of a student of this kind ("decoder", "encoder_decoder") with
    the optim section's settings: f(graphdef, params, teacher_graphdef, teacher_params,
    batch, dist)."""
    if kind == "encoder_decoder":
        return functools.partial(seq2seq_distill_sums, z_loss=optim.z_loss)
    return functools.partial(distill_sums, z_loss=optim.z_loss, block=optim.loss_block,
                             routing=(optim.moe_aux_loss, optim.moe_z_loss))


def cached_distill_sums(graphdef: Any, params: Any, batch: dict,
                        dist: ml_collections.ConfigDict, optim: ml_collections.ConfigDict
                        ) -> tuple[jax.Array, dict]:
    """distill_sums against the teacher's cached top-k (batch["teacher_logits"],
    batch["teacher_ids"]: jaxlm.data.teacher_cache), with the optim section's z-loss, loss
    block and routers' losses."""
    model = nnx.merge(graphdef, params)

    def kd(logits, weights, t_logits, t_ids):
        return kd_topk_sums(logits, t_logits, t_ids, weights, dist.temperature)

    x_BxLxD, figures = hidden_and_routing(model, batch)
    return with_routing(*_taught_sums(model, x_BxLxD, (batch["teacher_logits"],
                                                        batch["teacher_ids"]),
                                      kd, batch, dist, optim.z_loss, optim.loss_block),
                        figures, optim.moe_aux_loss, optim.moe_z_loss)


def teacher_topk(graphdef: Any, params: Any, batch: dict, top_k: int, block: int = 0
                 ) -> tuple[jax.Array, jax.Array]:
    """The teacher's `top_k` largest logits at every position and their ids (B x L x k,
    largest first), its logits made blockwise as the loss makes them."""
    model = nnx.merge(graphdef, params)
    x_BxLxD = model.hidden_states(*_inputs(batch))
    shards = context.shards()
    size = loss_block(x_BxLxD.shape[1], model.cfg.vocab_size, block, shards)
    return blockwise_map(lambda x_BxCxD: tuple(jax.lax.top_k(model.head_logits(x_BxCxD), top_k)),
                         (x_BxLxD,), size, shards)


def distill_metrics(sums: dict, denom: jax.Array, alpha: float) -> dict:
    out = token_metrics(sums, denom)
    out["ce_loss"], out["kd_loss"] = out["loss"], sums["kd_sum"] / denom
    out["loss"] = alpha * out["kd_loss"] + (1.0 - alpha) * out["ce_loss"]
    return out


def _objective(plain: Objective, dist: ml_collections.ConfigDict, taught) -> Objective:
    """A pretraining student's objective: taught(params, frozen, batch) in training; in
    evaluation its task's own (`plain`: the student's cross-entropy, no teacher)."""
    def sums(trainable, frozen, batch, key, train):
        if not train:
            return plain.sums(trainable, frozen, batch, key, False)
        return taught(trainable["params"], frozen, batch)

    return Objective(sums, lambda s, denom: distill_metrics(s, denom, dist.alpha))


def _check_vocabulary(key: str, student: tuple[str, int], teacher: tuple[str, int]) -> None:
    """(tokenizer name, vocabulary) of both: they must be the same."""
    if tuple(student) != tuple(teacher):
        raise ConfigError(f"{key}: the teacher's tokenizer and vocabulary ({teacher[0]}, "
                          f"{teacher[1]:,} rows) differ from the student's ({student[0]}, "
                          f"{student[1]:,}); distillation compares their distributions token "
                          f"by token, so both must be the same")


def _check_fingerprint(recorded: dict, found: str, where: str) -> None:
    if found != recorded.get("distill", {}).get("teacher_fingerprint"):
        raise TeacherMismatchError(
            f"teacher {where} does not match the one this run started with (fingerprint "
            f"{found} != {recorded.get('distill', {}).get('teacher_fingerprint')})")


class Teacher:
    """The run `distill.teacher` names, checked against the student's tokenizer, vocabulary
    and sequence length; `place(mesh)`, then `load()` its parameters (a frozen input of the
    step; `load(metadata)` checks them against what a resumed run recorded)."""

    def __init__(self, path: str, student: tuple[str, int], seq_len: int,
                 kind: str = "decoder"):
        self.step_dir = rundir.latest_step_dir(path)
        self.model = rundir.config_of(rundir.read_metadata(self.step_dir), self.step_dir).model
        self.kind = kind
        where = f"config.distill.teacher: {self.step_dir}"
        if zoo.family(self.model.family).kind != kind:
            raise ConfigError(f"{where} is a {self.model.family} run; this student's teacher "
                              f"is {'an' if kind[0] in 'ae' else 'a'} {kind.replace('_', '-')}")
        if self.model.max_seq_len < seq_len:
            raise ConfigError(f"{where} holds {self.model.max_seq_len} positions "
                              f"(model.max_seq_len); data.seq_len is {seq_len}")
        _check_vocabulary("config.distill.teacher", student,
                          (rundir.load_tokenizer(self.step_dir).name, self.model.vocab_size))
        self.fingerprint = ""

    def place(self, mesh) -> None:
        """The teacher's graphdef and abstract parameters on `mesh`."""
        self.graphdef, state = nnx.split(zoo.abstract(self.model))
        self.abstract = rules.abstract_of(state, mesh)

    def load(self, metadata: dict[str, Any] | None = None) -> Any:
        """Its parameters (after `place`), fingerprinted; with a resumed run's `metadata`,
        checked against the fingerprint it recorded."""
        params = checkpoint_lib.restore_params(self.step_dir, self.abstract)
        self.fingerprint = fingerprint.digest(params)
        if metadata is not None:
            _check_fingerprint(metadata, self.fingerprint, str(self.step_dir))
        return params

    def record(self) -> dict[str, str]:
        """What a checkpoint's metadata records of it ("distill")."""
        return {"teacher": str(self.step_dir), "teacher_fingerprint": self.fingerprint}

    def describe(self, dist: ml_collections.ConfigDict) -> str:
        return (f"distilled from {self.step_dir} ({zoo.param_count(self.model):,} parameters, "
                f"alpha {dist.alpha}, temperature {dist.temperature})")

    def forward_flops(self, seq_len: int) -> float:
        """The teacher's forward pass per token (a third of its training FLOPs)."""
        return zoo.flops_per_token(self.model, seq_len) / 3


class _Taught:
    """What an online teacher adds to a pretraining task (mixed in before it): the teacher
    in the step as a frozen input, its objective in training, the task's own in
    evaluation."""

    cfg: ml_collections.ConfigDict

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(cfg, workdir, **kwargs)
        self.name = "distill"
        self.teacher = Teacher(self.cfg.distill.teacher,
                               (self.tokenizer.name, self.cfg.model.vocab_size),
                               self.cfg.data.seq_len, zoo.family(self.cfg.model.family).kind)

    def state_spec(self, tx, mesh) -> state_lib.StateSpec:
        self.teacher.place(mesh)
        self.graphdef, spec = model_state_spec(self.cfg.model, tx, mesh, self.cfg.train.seed,
                                               self.cfg.quant,
                                               frozen={"teacher": self.teacher.abstract})
        return spec

    def objective(self) -> Objective:
        graphdef, teacher_graphdef = self.graphdef, self.teacher.graphdef
        optim, dist = self.cfg.optim, self.cfg.distill
        taught = teacher_sums(self.teacher.kind, optim)
        return _objective(super().objective(), dist, lambda p, frozen, batch: taught(
            graphdef, p, teacher_graphdef, frozen["teacher"], batch, dist))

    def init_state(self) -> state_lib.TrainState:
        state = super().init_state()
        self.frozen = {"teacher": self.teacher.load()}
        return state

    def resume(self, state: state_lib.TrainState, metadata: dict[str, Any]) -> state_lib.TrainState:
        """Reloads the teacher and checks it against the fingerprint the run recorded."""
        self.frozen = {"teacher": self.teacher.load(metadata)}
        return state

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "distill": self.teacher.record()}

    def describe(self) -> str:
        return f"{super().describe()}; {self.teacher.describe(self.cfg.distill)}"

    def flops_per_token(self) -> float:
        """The student's training FLOPs and the teacher's forward pass."""
        return super().flops_per_token() + self.teacher.forward_flops(self.cfg.data.seq_len)


class Distill(_Taught, CausalLM):
    """Causal-LM pretraining of the config's model against `distill.teacher`."""

    name = "distill"


class SpanCorruptionDistill(_Taught, SpanCorruption):
    """Span-corruption pretraining of an encoder-decoder against an encoder-decoder
    `distill.teacher`, over the decoder's targets."""

    name = "distill"


class CachedDistill(CausalLM):
    """Distillation from `distill.cache` (written by `jaxlm distill cache`): the teacher's
    top-k logits of every training batch, read with the batches; no teacher in the step."""

    name = "distill"

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(cfg, workdir, **kwargs)
        self.name = "distill"
        self.cache = teacher_cache.TeacherCache(self.cfg.distill.cache)
        meta, where = self.cache.meta, f"config.distill.cache: {self.cache.directory}"
        if self.cfg.distill.teacher:
            named = str(rundir.latest_step_dir(self.cfg.distill.teacher))
            if named != meta["teacher"]:
                raise ConfigError(f"{where} holds the predictions of {meta['teacher']}; "
                                  f"config.distill.teacher names {named}")
        _check_vocabulary("config.distill.cache", (self.tokenizer.name, self.cfg.model.vocab_size),
                          (meta["tokenizer"], int(meta["vocab_size"])))
        self.cache.check_batches(pipeline.order_meta(self.cfg.data, "train", self.tokenizer))
        if self.cache.steps < self.cfg.train.steps:
            raise ConfigError(f"{where} holds {self.cache.steps} steps; train.steps is "
                              f"{self.cfg.train.steps}")

    def batch_layout(self) -> BatchLayout:
        rows, length = self.cfg.data.global_batch_size, self.cfg.data.seq_len
        taught = (rows, length, self.cache.top_k)
        return {**super().batch_layout(),
                "teacher_logits": (taught, jnp.float32, ("batch", "sequence", None)),
                "teacher_ids": (taught, jnp.int32, ("batch", "sequence", None))}

    def eval_batch_shardings(self) -> dict[str, NamedSharding]:
        return {k: v for k, v in self.batch_shardings().items() if not k.startswith("teacher_")}

    def train_batches(self, rows: list[int], say) -> Batches:
        return teacher_cache.WithTeacher(super().train_batches(rows, say), self.cache, rows)

    def objective(self) -> Objective:
        graphdef, optim, dist = self.graphdef, self.cfg.optim, self.cfg.distill
        return _objective(super().objective(), dist, lambda p, frozen, batch: cached_distill_sums(
            graphdef, p, batch, dist, optim))

    def resume(self, state: state_lib.TrainState, metadata: dict[str, Any]) -> state_lib.TrainState:
        """Checks the cache's teacher against the one the run recorded."""
        _check_fingerprint(metadata, self.cache.meta["teacher_fingerprint"],
                           f"{self.cache.meta['teacher']} (cached in {self.cache.directory})")
        return super().resume(state, metadata)

    def metadata(self) -> dict[str, Any]:
        out = super().metadata()
        out["distill"] = {"teacher": self.cache.meta["teacher"],
                          "teacher_fingerprint": self.cache.meta["teacher_fingerprint"],
                          "cache": str(self.cache.directory), "top_k": self.cache.top_k}
        return out

    def describe(self) -> str:
        return (f"{super().describe()}; distilled from {self.cache.meta['teacher']}'s top-"
                f"{self.cache.top_k} logits cached in {self.cache.directory} (alpha "
                f"{self.cfg.distill.alpha}, temperature {self.cfg.distill.temperature})")
