"""The Task interface: what varies between training objectives, as the one loop
(jaxlm.train.loop) sees it.

A task is built from a config (cheap: it validates the config and resolves what the config
leaves open, such as the vocabulary or a fine-tuning base) and then, in the loop's order:

    batches = task.train_batches(rows, say)   this process's rows of each global batch,
                                              with a resumable position (`Batches`)
    task.build(mesh)                          the state layout and the jitted steps, inside
                                              jaxlm.parallel.mesh.use(mesh)
    state = task.init_state()                 from scratch, init_from or a base; or
    state = task.resume(state, metadata)      a restored state, checked against the run
    task.metadata()                           what each checkpoint records
    task.evaluate(state, split, max_batches)  figures on a split (in the loop every
                                              train.eval_every steps, and `jaxlm eval`)
    task.language_model(state)                the decoder to score and generate with
                                              (train.lm_eval_every)

The step has one signature for every task, (state, frozen, batch) -> (state, metrics),
built by jaxlm.train.step from the task's `Objective`; `frozen` holds inputs the step reads
but never trains (a LoRA base; {} for most tasks). Causal-LM pretraining
(jaxlm.train.lm) is a task; fine-tuning tasks live in jaxlm.finetune. Later objectives
(masked LM, span corruption, preference tuning, distillation) are tasks too: a new
objective is a new Task, never a new loop.
"""

from __future__ import annotations

import abc
import math
import os
import pathlib
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint import rundir
from jaxlm.data import tokenizers
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules
from jaxlm.train import optimizer as optimizer_lib
from jaxlm.train import step as step_lib
from jaxlm.train.state import StateSpec, TrainState

Say = Callable[[str], None]
# Batch key -> (shape, dtype, logical axes), for a global batch.
BatchLayout = dict[str, tuple[tuple[int, ...], Any, tuple[str, ...]]]


class Batches(Protocol):
    """A task's training input: this process's rows of each global batch, in step order."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]:
        """This process's position (JSON), gathered from every process at a save."""

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Every process's position -> the one state saved with a checkpoint."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue after a saved state; a state that does not fit this data is an error."""

    def progress(self, step: int) -> dict[str, float]:
        """Extra scalars for the log after `step` (e.g. the epoch); may be empty."""

    def close(self) -> None: ...


def token_batch_layout(global_batch: int, seq_len: int) -> BatchLayout:
    """The (batch, sequence) arrays of a token-level objective (causal LM, SFT)."""
    rows = ((global_batch, seq_len), jnp.int32, ("batch", "sequence"))
    return {"inputs": rows, "targets": rows, "segment_ids": rows, "positions": rows,
            "weights": ((global_batch, seq_len), jnp.float32, ("batch", "sequence"))}


class Task(abc.ABC):
    """Base of every task. Subclasses set `cfg` (the run's complete config) and `tokenizer`
    in __init__ and implement the abstract methods; `build` fills `spec`, `train_step`
    (jitted, not yet compiled) and `eval_sums`."""

    name: str  # "causal_lm", "sft", "classify", ...
    cfg: ml_collections.ConfigDict
    tokenizer: tokenizers.Tokenizer
    spec: StateSpec
    mesh: Mesh
    train_step: Callable  # jitted (state, frozen, batch) -> (state, metrics)
    eval_sums: Callable  # jitted (trainable groups, frozen, batch) -> sums
    frozen: dict[str, Any]  # the step's frozen inputs, set by init_state / resume

    # ---- what a subclass defines ---------------------------------------------------------

    @abc.abstractmethod
    def batch_layout(self) -> BatchLayout:
        """Shape, dtype and logical axes of every array of one global batch."""

    @abc.abstractmethod
    def objective(self) -> step_lib.Objective:
        """The summed objective and the metrics it reports (call after `state_spec`)."""

    @abc.abstractmethod
    def state_spec(self, tx, mesh: Mesh) -> StateSpec:
        """The state layout on `mesh` (no mesh context needed); allocates nothing."""

    @abc.abstractmethod
    def train_batches(self, rows: list[int], say: Say) -> Batches:
        """This process's `rows` of every global batch; reads and checks the data."""

    @abc.abstractmethod
    def init_state(self) -> TrainState:
        """A fresh state (after `build`); sets `self.frozen`."""

    def resume(self, state: TrainState, metadata: dict[str, Any]) -> TrainState:
        """A restored state, checked against what the run recorded; sets `self.frozen`."""
        self.frozen = {}
        return state

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """What each checkpoint records (after init_state or resume)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the start of a run: model, what trains."""

    @abc.abstractmethod
    def flops_per_token(self) -> float:
        """Analytic model FLOPs of one trained token (jaxlm.model.counts)."""

    @abc.abstractmethod
    def evaluate(self, state: TrainState, split: str = "validation",
                 max_batches: int | None = None) -> dict[str, float]:
        """Figures of the state on `split` (its trainable groups are what is read): the
        first `max_batches` batches (None: all), the same batches every call."""

    def language_model(self, state: TrainState) -> tuple[ml_collections.ConfigDict, Any]:
        """(model config, parameters) of the language model that `state` stands for, to
        score and generate with (train.lm_eval_every): a decoder task's trained parameters
        as they are sharded (jaxlm.train.validate admits it for decoder tasks only)."""
        return self.cfg.model, state["params"]

    def eval_label(self, split: str) -> str:
        """What `split` is, for the eval line ("stdlib validation")."""
        return f"{self.name} {split}"

    # ---- shared --------------------------------------------------------------------------

    def build(self, mesh: Mesh) -> None:
        """Optimizer, state layout and jitted steps on `mesh` (nothing is traced yet: lower
        and run the steps inside `mesh_lib.use(mesh)`, where tracing applies the activation
        constraints)."""
        cfg = self.cfg
        self.mesh = mesh
        self.tx = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps)
        self.schedule = optimizer_lib.learning_rate_schedule(cfg.optim, cfg.train.steps)
        self.spec = self.state_spec(self.tx, mesh)
        objective = self.objective()
        self.train_step = step_lib.jit_train_step(
            step_lib.make_train_step(objective, self.spec.groups, cfg.optim, self.tx,
                                     self.schedule, cfg.train.seed, cfg.train.nonfinite),
            self.spec, self.batch_shardings(), mesh)
        self.eval_sums = step_lib.jit_eval_sums(objective, self.spec,
                                                self.eval_batch_shardings(), mesh)

    def restore_newest(self, workdir: str | os.PathLike) -> tuple[TrainState, pathlib.Path]:
        """(state, step directory) of the run's newest checkpoint, on a mesh built for this
        task: the groups its evaluation reads, resumed (a LoRA base reloaded and checked
        against its recorded fingerprint). For reading a run, not for training on."""
        step_dir = rundir.latest_step_dir(workdir)
        mesh = mesh_lib.make_mesh(self.cfg.mesh)
        with mesh_lib.use(mesh):
            self.build(mesh)
            groups = checkpoint_lib.restore_groups(
                step_dir, {g: self.spec.abstract[g] for g in self.spec.groups})
            return self.resume(groups, rundir.read_metadata(step_dir)), step_dir

    def batch_shardings(self, mesh: Mesh | None = None) -> dict[str, NamedSharding]:
        mesh = mesh or self.mesh
        return {k: NamedSharding(mesh, rules.logical_to_spec(axes))
                for k, (_, _, axes) in self.batch_layout().items()}

    def eval_batch_shardings(self) -> dict[str, NamedSharding]:
        """An evaluation batch's (the training batch's, unless training batches carry more:
        a cached teacher's predictions)."""
        return self.batch_shardings()

    def abstract_batch(self, mesh: Mesh | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        shardings = self.batch_shardings(mesh)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
                for k, (shape, dtype, _) in self.batch_layout().items()}

    def lower(self) -> jax.stages.Lowered:
        """The train step lowered for the state, frozen inputs and batch shapes (after
        `build`): `.compile()` it to run, or read its cost without running."""
        return self.train_step.lower(self.spec.abstract, self.spec.frozen_abstract,
                                     self.abstract_batch())

    def to_global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a batch -> global arrays sharded as the step takes them."""
        return mesh_lib.to_global(host, self.batch_shardings())

    def sum_batches(self, state: TrainState, host_batches: Iterator[dict[str, np.ndarray]],
                    max_batches: int | None = None
                    ) -> tuple[dict[str, float | np.ndarray], int]:
        """(every sum of `eval_sums` added over the batches in float64 on the host: a float,
        or an array for a sum with axes such as a mixture's per-expert load; the number of
        batches). Results are read once at the end; while batch k runs, the host
        prepares batch k + 1 and waits for k - 1 no sooner (XLA:CPU's in-process collectives
        can deadlock with hundreds of sharded steps queued at once: seen with 4-bit weights
        gathered over 8 simulated devices)."""
        trainable = {g: state[g] for g in self.spec.groups}
        pending = []
        with mesh_lib.use(self.mesh):
            for i, host in enumerate(host_batches):
                if max_batches is not None and i >= max_batches:
                    break
                pending.append(self.eval_sums(trainable, self.frozen, self.to_global(host)))
                if len(pending) > 1:
                    jax.block_until_ready(pending[-2])
        totals: dict[str, float | np.ndarray] = {}
        for sums in jax.device_get(pending):
            for k, v in sums.items():
                v = np.asarray(v, np.float64)
                totals[k] = totals.get(k, 0.0) + (float(v) if v.ndim == 0 else v)
        return totals, len(pending)


def token_figures(totals: dict[str, float], batches: int) -> dict[str, float]:
    """Loss (mean cross-entropy per target token), perplexity, tokens and batches."""
    tokens = totals.get("weight_sum", 0.0)
    loss = totals["ce_sum"] / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"),
            "tokens": tokens, "batches": batches}
