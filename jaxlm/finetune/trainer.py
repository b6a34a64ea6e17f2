"""`jaxlm finetune`: a fine-tuning run, top to bottom.

Sections: config and base; workdir; data; optimizer, state and steps; compile; restore or
start from the base; loop (batch -> step -> metrics -> eval -> checkpoint).

A run starts from `finetune.base` (its parameters, fresh optimizer, step 0) and is then its
own run: its checkpoints hold the trainable state only (LoRA: the adapters), and the config
saved with them names the exact base step directory, so a resumed run reloads the same base
and checks it bit for bit against the fingerprint recorded when the run started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import distributed
from jaxlm import metrics as metrics_lib
from jaxlm import sharding
from jaxlm.data import tokenizers
from jaxlm.finetune import classify_data, options, records as records_lib, rows as rows_lib
from jaxlm.finetune import sft_data, state as state_lib, step as step_lib, templates
from jaxlm.train import optimizer as optimizer_lib
from jaxlm.train import preemption
from jaxlm.train.loop import NonFiniteLoss, Preempted, check_finite, check_workdir

RUNTIME_MODEL_KEYS = ("dtype", "remat", "attention", "scan_layers")  # never change parameters


class BaseMismatchError(ValueError):
    """A resumed run's base checkpoint or data is not the one it started from."""


@dataclasses.dataclass(frozen=True)
class Base:
    step_dir: pathlib.Path  # the exact checkpoint the run starts from
    config: ml_collections.ConfigDict  # the base run's saved config
    tokenizer: tokenizers.Tokenizer


def _has_checkpoints(workdir: pathlib.Path) -> bool:
    d = workdir / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def resolve_base(path: str | os.PathLike) -> Base:
    """The base's newest checkpoint (or the step given), its saved config and tokenizer."""
    from jaxlm.generate import saved_config
    saved, step_dir = saved_config(path)
    tokenizer = tokenizers.load_saved(step_dir.parent.parent / "tokenizer")
    return Base(step_dir, saved, tokenizer)


def run_config(cfg: ml_collections.ConfigDict, base: Base, num_devices: int
               ) -> ml_collections.ConfigDict:
    """The fine-tuning config with the base's model (RUNTIME_MODEL_KEYS from `cfg`) and
    tokenizer, and finetune.base pinned to the base's step directory; validated."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    model = ml_collections.ConfigDict(base.config.model.to_dict())
    for key in RUNTIME_MODEL_KEYS:
        model[key] = cfg.model[key]
    out.model = model
    out.data.tokenizer = base.config.data.tokenizer
    out.data.tokenizer_path = base.config.data.tokenizer_path
    out.finetune.base = str(base.step_dir)
    config_lib.validate(out, num_devices)
    return out


def fingerprint(tree: Any) -> str:
    """A short hash of the per-array fingerprints (checkpoint.checksums) of a tree."""
    sums = checkpoint_lib.checksums(tree)
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:16]


def load_data(cfg: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer, say
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train rows, eval rows) of the task, every line checked before the model is built."""
    ft, seq_len = cfg.finetune, cfg.data.seq_len
    train_records = records_lib.read_jsonl(ft.train_file)
    if ft.eval_file:
        eval_records = records_lib.read_jsonl(ft.eval_file)
    else:
        train_records, eval_records = records_lib.split_eval(train_records, ft.eval_fraction,
                                                            cfg.data.shuffle_seed)
    out = []
    for name, recs in (("train", train_records), ("eval", eval_records)):
        if ft.task == "sft":
            template = templates.load_template(ft.template)
            examples, counts = sft_data.load_examples(recs, template, tokenizer, seq_len,
                                                      ft.overlong)
            rows = sft_data.pack(examples, seq_len, ft.packing)
            say(f"{name}: {counts.examples:,} examples in {len(rows['inputs']):,} rows of "
                f"{seq_len} ({int(rows['weights'].sum()):,} trained tokens); "
                f"{counts.skipped_overlong} skipped (prompt longer than seq_len), "
                f"{counts.truncated} truncated")
        else:
            rows, skipped = classify_data.load_rows(
                recs, tokenizer, seq_len, ft.text_field, ft.label_field, options.num_labels(ft),
                options.label_names(ft), ft.overlong)
            counts = np.bincount(rows["labels"], minlength=options.num_labels(ft))
            say(f"{name}: {len(rows['labels']):,} examples, per label {counts.tolist()}; "
                f"{skipped} skipped (longer than seq_len)")
        out.append(rows)
    return out[0], out[1]


def to_global(host: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host.items()}


def evaluate(eval_step, state: dict, frozen: dict, groups, eval_rows, task: str,
             global_batch: int, local_rows, shardings) -> dict[str, float]:
    """Loss (and accuracy) over every eval row, sums added in float64 on the host."""
    trainable = {g: state[g] for g in groups}
    pending = [eval_step(trainable, frozen, to_global(b, shardings))
               for b in rows_lib.eval_batches(eval_rows, global_batch, local_rows)]
    totals: dict[str, float] = {}
    for sums in jax.device_get(pending):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    denom = max(totals["weight_sum"], 1.0)
    out = {"eval_loss": totals["ce_sum"] / denom}
    if task == "classify":
        out["eval_accuracy"] = totals["correct_sum"] / denom
        out["eval_examples"] = totals["weight_sum"]
    else:
        out["eval_tokens"] = totals["weight_sum"]
    return out


def finetune(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Fine-tunes to cfg.train.steps, resuming from the workdir's latest checkpoint. Returns
    the logged metrics (train steps, and eval records with eval_* keys)."""
    # ---- config and base ------------------------------------------------------------
    config_lib.validate(cfg, jax.device_count())  # the finetune keys, before anything is read
    if not cfg.finetune.task:
        raise config_lib.ConfigError(f"config.finetune.task: set one of {options.TASKS} "
                                     f"(this is a pretraining config: use `jaxlm train`)")
    is_writer = jax.process_index() == 0
    say = print if is_writer else (lambda *a, **k: None)
    workdir = pathlib.Path(workdir)
    resuming = _has_checkpoints(workdir)
    base_path = cfg.finetune.base
    if resuming:  # the base this run started from, whatever the config names now
        from jaxlm.generate import saved_config
        base_path = saved_config(workdir)[0].finetune.base
    base = resolve_base(base_path)
    cfg = run_config(cfg, base, jax.device_count())
    ft = cfg.finetune
    mesh = sharding.make_mesh(cfg.mesh)

    # ---- workdir ----------------------------------------------------------------------
    check_workdir(workdir)
    if is_writer:
        base.tokenizer.save(workdir / "tokenizer")  # `jaxlm generate` reads it from here

    # ---- data ---------------------------------------------------------------------------
    train_rows, eval_rows = load_data(cfg, base.tokenizer, say)
    data_fp = rows_lib.fingerprint(train_rows)
    global_batch = cfg.data.global_batch_size
    local_rows = distributed.local_rows(sharding.batch_sharding(mesh), global_batch)
    batches = rows_lib.TrainBatches(train_rows, global_batch, cfg.data.shuffle_seed, local_rows)

    # ---- optimizer, state, steps, compile ---------------------------------------------------
    total_steps, seed = cfg.train.steps, cfg.train.seed
    tx = optimizer_lib.make_optimizer(cfg.optim, total_steps)
    schedule = optimizer_lib.learning_rate_schedule(cfg.optim, total_steps)
    shardings = step_lib.batch_shardings(ft.task, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        fs = state_lib.spec(cfg.model, ft, tx, mesh, seed)
        train_step = step_lib.jit_train_step(
            step_lib.make_train_step(fs, ft, cfg.optim, tx, schedule, seed, cfg.train.nonfinite),
            fs, ft.task, mesh)
        start = time.perf_counter()
        compiled_step = train_step.lower(fs.abstract, fs.frozen_abstract, step_lib.abstract_batch(
            ft.task, global_batch, cfg.data.seq_len, mesh)).compile()
        compile_s = time.perf_counter() - start
        eval_step = step_lib.make_eval_step(fs, ft, mesh)

        # ---- restore, or start from the base ------------------------------------------
        checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint)
        checkpointer.check_capacity(checkpoint_lib.state_nbytes(fs.abstract))
        restored = checkpointer.restore_latest(fs.abstract)
        base_params = None
        if restored is None or ft.method == "lora":
            base_params = checkpoint_lib.restore_params(base.step_dir, fs.base_abstract)
        base_fp = fingerprint(base_params) if base_params is not None else None
        if restored is not None:
            step0, state, data_state, saved_meta = restored
            recorded = saved_meta.get("finetune", {})
            if base_fp is not None and recorded.get("base_fingerprint") != base_fp:
                raise BaseMismatchError(f"base {base.step_dir} does not match the one this run "
                                        f"started from (fingerprint {base_fp} != "
                                        f"{recorded.get('base_fingerprint')})")
            if data_state.get("train_rows_fingerprint") != data_fp:
                raise BaseMismatchError(f"the training data ({ft.train_file}) changed since this "
                                        f"run started: resume it with the same data, or start a "
                                        f"new run in another workdir")
            base_fp = recorded.get("base_fingerprint")
            say(f"resumed from {checkpointer.directory / str(step0)}")
        else:
            state = state_lib.init_state(cfg.model, ft, tx, fs, base_params, seed)
            say(f"parameters from {base.step_dir}; fresh optimizer, step 0")
        frozen = {"params": base_params} if ft.method == "lora" else {}
    metadata = checkpoint_lib.run_metadata(cfg, fs.axes["adapters" if ft.method == "lora"
                                                        else "params"], base.tokenizer.name)
    metadata["finetune"] = {"task": ft.task, "method": ft.method, "base": str(base.step_dir),
                            "base_fingerprint": base_fp, "train_rows": len(train_rows["inputs"]),
                            "train_rows_fingerprint": data_fp, "groups": list(fs.groups)}
    trainable_count = sum(int(np.prod(x.shape)) for g in fs.groups
                          for x in jax.tree.leaves(fs.abstract[g]))
    say(f"fine-tuning ({ft.task}, {ft.method}): {trainable_count:,} trainable parameters; "
        f"mesh {dict(mesh.shape)}; compiled in {compile_s:.1f}s")

    # ---- loop ---------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, cfg.metrics.tensorboard, active=is_writer)
    logged: list[dict[str, Any]] = []

    def run_eval(step: int) -> None:
        with jax.set_mesh(mesh), sharding.axis_rules():
            scalars = evaluate(eval_step, state, frozen, fs.groups, eval_rows, ft.task,
                               global_batch, local_rows, shardings)
        writer.write(step, scalars)
        logged.append({"step": step, **scalars})
        say(f"eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()))

    first_step = int(jax.device_get(state["step"])) + 1
    nonfinite_seen = int(jax.device_get(state["nonfinite_steps"]))
    if first_step == 1:
        run_eval(0)
    last_log_time, last_log_step = time.perf_counter(), first_step - 1
    try:
        with preemption.PreemptionWatch() as watch:
            for step in range(first_step, total_steps + 1):
                batch = to_global(batches.batch(step), shardings)
                state, step_metrics = compiled_step(state, frozen, batch)
                is_log = step % cfg.train.log_every == 0 or step == total_steps
                is_eval = step == total_steps or (ft.eval_every and step % ft.eval_every == 0)
                stop = watch.should_stop(step)
                is_save = checkpointer.should_save(step, total_steps) or stop
                if is_log or is_save or is_eval:
                    nonfinite_seen = check_finite(state, nonfinite_seen, last_log_step, step,
                                                  cfg.train.nonfinite, checkpointer, say)
                if is_log:
                    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    now = time.perf_counter()
                    scalars["step_time_s"] = (now - last_log_time) / (step - last_log_step)
                    scalars["epoch"] = batches.epoch(step)
                    writer.write(step, scalars)
                    logged.append({"step": step, **scalars})
                    extra = f"  acc {scalars['accuracy']:.3f}" if "accuracy" in scalars else ""
                    say(f"step {step}/{total_steps}  loss {scalars['loss']:.4f}{extra}  "
                        f"lr {scalars['learning_rate']:.2e}  {scalars['step_time_s']:.2f}s/step  "
                        f"epoch {scalars['epoch']:.2f}")
                    last_log_time, last_log_step = time.perf_counter(), step
                if is_eval:
                    run_eval(step)
                if is_save:
                    checkpointer.save(step, state, {"step": step,
                                                    "train_rows_fingerprint": data_fp}, metadata)
                if stop:
                    checkpointer.wait()
                    raise Preempted(step, checkpointer.directory / str(step))
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    say(f"done: {total_steps} steps; checkpoints in {checkpointer.directory}")
    return logged


__all__ = ["finetune", "resolve_base", "run_config", "Base", "BaseMismatchError",
           "NonFiniteLoss", "Preempted"]
