"""The fine-tuning tasks: SFT, preference tuning (DPO, ORPO), classification, extractive QA
and text-to-text (seq2seq), each
with full fine-tuning or LoRA, run by the one training loop (jaxlm.train.loop) like
pretraining.

A run starts from `finetune.base` (its parameters, fresh optimizer, step 0) and is then its
own run: its checkpoints hold the trainable state only (LoRA: the adapters), and the config
saved with them names the exact base step directory, so a resumed run reloads the same base
and checks it bit for bit against the fingerprint recorded when the run started.

    state   {"step", "params" | "adapters", ["head"], "opt_state", "nonfinite_steps"}
    frozen  {"params": the base}   (LoRA only: read by the step, never trained or saved)
            {"reference": the base}   (DPO with full fine-tuning: its reference model)

What differs between the tasks (their rows, head, objective and evaluation) is the
`finetune.task`'s objective (objectives.py); everything else (the base, the state, LoRA,
the training rows' order, the metadata) is here, the same for every task.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from jaxlm import config as config_lib
from jaxlm.checkpoint import fingerprint, rundir
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.config import finetune as finetune_section
from jaxlm.data import tokenizers
from jaxlm.errors import ConfigError, UserError
from jaxlm.finetune import classify, lora, objectives
from jaxlm.finetune import records as records_lib
from jaxlm.finetune import rows as rows_lib
from jaxlm.model import quantized, zoo
from jaxlm.parallel import distributed, rules
from jaxlm.quant import weights as quant_weights
from jaxlm.train import distill
from jaxlm.train import state as state_lib
from jaxlm.train.step import Objective
from jaxlm.train.task import Batches, BatchLayout, Say, Task
from jaxlm.train.validate import validate

RUNTIME_MODEL_KEYS = ("dtype", "remat", "attention", "scan_layers")  # never change parameters


class BaseMismatchError(UserError, ValueError):
    """A resumed run's base checkpoint is not the one it started from."""


@dataclasses.dataclass(frozen=True)
class Base:
    step_dir: pathlib.Path  # the exact checkpoint the run starts from
    config: ml_collections.ConfigDict  # the base run's saved config
    tokenizer: tokenizers.Tokenizer


def resolve_base(path: str | os.PathLike) -> Base:
    """The base's newest checkpoint (or the step given), its saved config and tokenizer."""
    saved, step_dir = rundir.saved_config(path)
    return Base(step_dir, saved, rundir.load_tokenizer(step_dir))


def run_config(cfg: ml_collections.ConfigDict, base: Base, num_devices: int
               ) -> ml_collections.ConfigDict:
    """The fine-tuning config with the base's model (RUNTIME_MODEL_KEYS from `cfg`) and
    tokenizer, and finetune.base pinned to the base's step directory; validated."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    model = ml_collections.ConfigDict(base.config.model.to_dict())
    for key in RUNTIME_MODEL_KEYS:
        model[key] = cfg.model[key]
    if model.weights != "float":
        raise ConfigError(f"config.finetune.base: {base.step_dir} is a quantized run "
                          f"(model.weights={model.weights!r}, for inference); fine-tune the "
                          f"float run it came from (with QLoRA: finetune.base_quant)")
    if cfg.finetune.base_quant != "none":  # QLoRA: the base held quantized
        group = int(cfg.finetune.base_quant_group)
        for key, size in config_lib.grouped_dims(model).items():
            if group and size % group:
                raise ConfigError(f"config.finetune.base_quant_group: {group} does not divide "
                                  f"the base's model.{key}={size} (the groups run along it)")
        model.weights, model.weight_group = cfg.finetune.base_quant, group
    elif cfg.model.weights != "float":  # a fine-tuned run quantized by `jaxlm quantize`
        model.weights, model.weight_group = cfg.model.weights, cfg.model.weight_group
    out.model = model
    out.data.tokenizer = base.config.data.tokenizer
    out.data.tokenizer_path = base.config.data.tokenizer_path
    out.finetune.base = str(base.step_dir)
    validate(out, num_devices)
    return out


def build_model(model_cfg: ml_collections.ConfigDict, ft_cfg: ml_collections.ConfigDict,
                seed: int, train: bool = True) -> nnx.Module:
    """The model with adapters attached when the method is LoRA (without dropout unless
    `train`); QLoRA's with its base weights quantized (the adapters sized by the float
    weights)."""
    model = zoo.create(quant_weights.float_config(model_cfg), seed)
    if ft_cfg.method == "lora":
        lora.attach(model, zoo.family(model_cfg.family), ft_cfg.lora, seed, train=train)
    if model_cfg.weights != "float":
        quantized.quantize_model(model, model_cfg.weights, model_cfg.weight_group)
    return model


class FinetuneTask(Task):
    """`finetune.task` sft, classify, qa or seq2seq; `finetune.method` full or lora."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
                 *, num_devices: int | None = None):
        """`workdir`: the run; when it has checkpoints, its own base (the one recorded when
        it started) is used, whatever the config names now."""
        num_devices = num_devices or jax.device_count()
        config_lib.validate(cfg, num_devices)  # the finetune keys, before anything is read
        if not cfg.finetune.task:
            raise ConfigError(f"config.finetune.task: set one of {finetune_section.TASKS} "
                              f"(this is a pretraining config: use `jaxlm train`)")
        base_path = cfg.finetune.base
        if workdir is not None and rundir.has_checkpoints(workdir):
            base_path = rundir.saved_config(workdir)[0].finetune.base
        self.base = resolve_base(base_path)
        self.cfg = run_config(cfg, self.base, num_devices)
        self.tokenizer = self.base.tokenizer
        self.name = self.cfg.finetune.task
        self.lora = self.cfg.finetune.method == "lora"
        if self.lora:
            lora.check_targets(zoo.family(self.cfg.model.family), self.cfg.finetune.lora)
        self.kind = objectives.make(self.cfg, self.tokenizer, self.base.step_dir)
        self.teacher = None  # SFT distilled from distill.teacher (jaxlm.train.distill)
        if self.cfg.distill.teacher:
            self.teacher = distill.Teacher(self.cfg.distill.teacher,
                                           (self.tokenizer.name, self.cfg.model.vocab_size),
                                           self.cfg.data.seq_len,
                                           zoo.family(self.cfg.model.family).kind)
        self.frozen = {}
        self._rows: tuple[dict, dict] | None = None
        self._data_fingerprint: str | None = None
        self.base_fingerprint: str | None = None

    # ---- data ------------------------------------------------------------------------------

    def batch_layout(self) -> BatchLayout:
        return self.kind.batch_layout()

    def load_data(self, say: Say = lambda *a: None) -> tuple[dict, dict]:
        """(train rows, eval rows) of the task, every line checked; read once."""
        if self._rows is not None:
            return self._rows
        cfg, ft = self.cfg, self.cfg.finetune
        train_records = records_lib.read_jsonl(ft.train_file)
        if ft.eval_file:
            eval_records = records_lib.read_jsonl(ft.eval_file)
        else:
            train_records, eval_records = records_lib.split_eval(
                train_records, ft.eval_fraction, cfg.data.shuffle_seed)
        out = [self.kind.rows(recs, name, say)
               for name, recs in (("train", train_records), ("eval", eval_records))]
        self._rows = (out[0], out[1])
        return self._rows

    def train_batches(self, rows: list[int], say: Say) -> Batches:
        train_rows, _ = self.load_data(say)
        batches = rows_lib.TrainBatches(train_rows, self.cfg.data.global_batch_size,
                                        self.cfg.data.shuffle_seed, rows)
        self._data_fingerprint = batches.fingerprint
        return batches

    # ---- state and objective ---------------------------------------------------------------

    def state_spec(self, tx, mesh) -> state_lib.StateSpec:
        cfg, ft, seed = self.cfg.model, self.cfg.finetune, self.cfg.train.seed
        model = nnx.eval_shape(lambda: build_model(cfg, ft, seed))
        self.graphdef, _ = nnx.split(model)
        self.eval_graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, ft, seed,
                                                                             train=False)))
        base_state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.LoraParam)))
        self.base_abstract = rules.abstract_of(base_state, mesh)
        self.base_axes = rules.axes_of(base_state)
        trainable, axes, frozen = {}, {}, {}
        self.key_template = None
        if self.lora:
            adapters = nnx.state(model, lora.LoraParam)
            trainable["adapters"], axes["adapters"] = (rules.abstract_of(adapters, mesh),
                                                       rules.axes_of(adapters))
            frozen["params"] = self.base_abstract
            keys = nnx.to_pure_dict(nnx.state(model, lora.LoraKey))  # dropout, drawn per step
            self.key_template = keys if jax.tree.leaves(keys) else None
        else:
            trainable["params"], axes["params"] = self.base_abstract, self.base_axes
        if self.kind.needs_reference:  # DPO: the base, as a model without adapters
            plain = ml_collections.ConfigDict({**ft.to_dict(), "method": "full"})
            self.kind.reference_graphdef, _ = nnx.split(nnx.eval_shape(
                lambda: build_model(cfg, plain, seed)))
            if not self.lora:  # (LoRA's reference is its frozen base: no second copy)
                frozen["reference"] = self.base_abstract
        if self.teacher is not None:
            self.teacher.place(mesh)
            frozen["teacher"] = self.teacher.abstract
        if self.kind.head_outputs:
            c = self.kind.head_outputs
            shapes = {"w": (cfg.d_model, c), "b": (c,)}
            trainable["head"] = {
                k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=NamedSharding(
                    mesh, rules.logical_to_spec(classify.HEAD_AXES[k]))) for k in shapes}
            axes["head"] = dict(classify.HEAD_AXES)
        return state_lib.make_spec(trainable, axes, tx, mesh, frozen)

    def objective(self) -> Objective:
        graphdef, eval_graphdef, key_template = self.graphdef, self.eval_graphdef, self.key_template
        kind, use_lora = self.kind, self.lora
        teacher_graphdef = self.teacher.graphdef if self.teacher is not None else None
        optim, dist = self.cfg.optim, self.cfg.distill
        taught = None if self.teacher is None else distill.teacher_sums(self.teacher.kind, optim)

        def sums(trainable, frozen, batch, key, train):
            extra = {}
            if kind.needs_reference:
                extra["reference"] = frozen["params" if use_lora else "reference"]
            if use_lora:
                parts = [jax.lax.stop_gradient(frozen["params"]), trainable["adapters"]]
                if train and key_template is not None:
                    parts.append(lora.dropout_keys(key_template, key))
                params = lora.combine(*parts)
            else:
                params = trainable["params"]
            if train and teacher_graphdef is not None:  # (evaluation: the student's own loss)
                return taught(graphdef, params, teacher_graphdef, frozen["teacher"], batch, dist)
            return kind.sums(graphdef if train else eval_graphdef, params,
                             trainable.get("head"), batch, train, **extra)

        if teacher_graphdef is not None:
            return Objective(sums, lambda s, denom: distill.distill_metrics(s, denom, dist.alpha))
        return Objective(sums, kind.metrics)

    def eval_params(self, trainable: dict, frozen: dict) -> Any:
        """The parameters `eval_graphdef` reads (inside jit): the base, or base + adapters."""
        if self.lora:
            return lora.combine(frozen["params"], trainable["adapters"])
        return trainable["params"]

    def language_model(self, state: state_lib.TrainState
                       ) -> tuple[ml_collections.ConfigDict, Any]:
        """Full fine-tuning: the trained parameters. LoRA: the base with the adapters folded
        in on the host, in float64 (jaxlm.model.adapters.merge, as a LoRA run's checkpoint
        is read for generation: the same weights bit for bit); QLoRA's base as the float
        weights its codes stand for."""
        if not self.lora:
            return self.cfg.model, state["params"]
        base, model_cfg = to_host(self.frozen["params"]), self.cfg.model
        if model_cfg.weights != "float":
            base = quantized.dequantize_tree(base, model_cfg.weights)
            model_cfg = quant_weights.float_config(model_cfg)
        return model_cfg, lora.merge(base, to_host(state["adapters"]), self.cfg.finetune.lora)

    def _base_params(self) -> Any:
        """The base's parameters; QLoRA's quantized where they are read, shard by shard."""
        return quant_weights.restore_params(self.base.step_dir, self.cfg.model,
                                            self.base_abstract, self.mesh)

    def init_state(self) -> state_lib.TrainState:
        """The base's parameters (full) or new adapters (LoRA), a new head (classification),
        a fresh optimizer, step 0."""
        cfg, ft, seed = self.cfg.model, self.cfg.finetune, self.cfg.train.seed
        base = self._base_params()
        self.base_fingerprint = fingerprint.digest(base)
        lora_method, head_outputs = self.lora, self.kind.head_outputs

        def groups(base):
            out: dict = {}
            if lora_method:
                model = build_model(cfg, ft, seed)
                out["adapters"] = nnx.to_pure_dict(nnx.state(model, lora.LoraParam))
            else:
                out["params"] = base
            if head_outputs:
                out["head"] = classify.init_head(jax.random.fold_in(jax.random.key(seed), 1),
                                                 cfg.d_model, head_outputs, cfg.init_std)
            return out

        self.frozen = {"params": base} if self.lora else {}
        if self.kind.needs_reference and not self.lora:  # its own copy: `base` is donated
            self.frozen["reference"] = self._base_params()
        if self.teacher is not None:
            self.frozen["teacher"] = self.teacher.load()
        # Full fine-tuning: the base's buffers become the state's (donated, not copied).
        return state_lib.init_state(self.spec, self.tx, groups, base, donate=not self.lora)

    def resume(self, state: state_lib.TrainState, metadata: dict[str, Any]) -> state_lib.TrainState:
        """LoRA reloads the frozen base and checks it against the recorded fingerprint."""
        recorded = metadata.get("finetune", {}).get("base_fingerprint")
        self.frozen = {}
        if self.lora or self.kind.needs_reference:
            base = self._base_params()
            found = fingerprint.digest(base)
            if found != recorded:
                raise BaseMismatchError(f"base {self.base.step_dir} does not match the one this "
                                        f"run started from (fingerprint {found} != {recorded})")
            self.frozen = {"params" if self.lora else "reference": base}
        if self.teacher is not None:
            self.frozen["teacher"] = self.teacher.load(metadata)
        self.base_fingerprint = recorded
        return state

    def metadata(self) -> dict[str, Any]:
        ft = self.cfg.finetune
        out = checkpoint_lib.run_metadata(self.cfg, self.spec.axes["adapters" if self.lora
                                                                   else "params"],
                                          self.tokenizer.name)
        train_rows = next(iter(self._rows[0].values())) if self._rows else ()
        out["finetune"] = {"task": ft.task, "method": ft.method, "base": str(self.base.step_dir),
                           "base_fingerprint": self.base_fingerprint,
                           "train_rows": len(train_rows),
                           "train_rows_fingerprint": self._data_fingerprint,
                           "groups": list(self.spec.groups)}
        if self.teacher is not None:
            out["distill"] = self.teacher.record()
        return out

    def describe(self) -> str:
        ft = self.cfg.finetune
        return (f"fine-tuning ({ft.task}, {ft.method}): {self.spec.trainable_count:,} trainable "
                f"parameters" + (f"; {self.teacher.describe(self.cfg.distill)}"
                                 if self.teacher is not None else ""))

    def flops_per_token(self) -> float:
        adapters = self.spec.trainable_count if self.lora else 0
        if self.kind.head_outputs:
            adapters -= sum(int(x.size) for x in jax.tree.leaves(self.spec.abstract["head"]))
        teacher = self.teacher.forward_flops(self.cfg.data.seq_len) if self.teacher else 0.0
        return self.kind.flops_per_token(self.lora, max(adapters, 0)) + teacher

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, state, split: str = "validation", max_batches: int | None = None
                 ) -> dict[str, float]:
        """The task's figures (objectives.py) over every row of the held-out examples
        ("validation") or of the training examples ("train"), in order."""
        if split not in ("train", "validation"):
            raise UserError(f"split {split!r} is not one of train, validation")
        train_rows, eval_rows = self.load_data()
        rows, name = (eval_rows, "eval") if split == "validation" else (train_rows, "train")
        return self.kind.evaluate(self, state, rows, name, max_batches)

    def eval_batches(self, rows: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of every global batch of `rows`, once, in order (the last
        padded with zero rows)."""
        global_batch = self.cfg.data.global_batch_size
        local = distributed.local_rows(rules.batch_sharding(self.mesh), global_batch)
        return rows_lib.eval_batches(rows, global_batch, local)

    @staticmethod
    def gather(x: jax.Array) -> np.ndarray:
        """Every row of a batch-sharded array on this host, in order."""
        return to_host(x)

    def eval_label(self, split: str) -> str:
        ft = self.cfg.finetune
        where = ft.eval_file if split == "validation" and ft.eval_file else ft.train_file
        held = " (held-out part)" if split == "validation" and not ft.eval_file else ""
        return f"{ft.task} {split}: {where}{held}"


def to_host(tree: Any) -> Any:
    """Every element of each (sharded) array of `tree` as a NumPy array on this host."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        tree)
