"""`jaxlm train`: the training loop, top to bottom.

Sections: config and mesh; workdir; input; model, optimizer and sharded state; compile;
restore or initialise; loop (data -> step -> metrics -> checkpoint).
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import distributed
from jaxlm import metrics as metrics_lib
from jaxlm import sharding
from jaxlm.data import pipeline, sources, tokenizers
from jaxlm.model.transformer import param_count
from jaxlm.train import preemption
from jaxlm.train import state as state_lib
from jaxlm.train import step as step_lib


def check_workdir(workdir: pathlib.Path) -> None:
    """Fails now, not at the first checkpoint, if the workdir cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"workdir {workdir} is not writable: {e}") from e


def prepare_sources(data_cfg: ml_collections.ConfigDict) -> dict[str, dict]:
    """Builds every source of the mixture once (process 0; the others wait) and returns
    each one's build statistics."""
    names = [name for name, _ in config_lib.parse_mixture(data_cfg.dataset)]
    if jax.process_index() == 0:
        stats = {name: sources.prepare(data_cfg, name) for name in names}
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm: sources prepared")
        if jax.process_index() != 0:
            stats = {name: sources.prepare(data_cfg, name) for name in names}  # already built
    return stats


def batch_stats(batch: dict[str, np.ndarray], bos_id: int | None) -> dict[str, int]:
    """Real tokens, slots and documents started in a host batch (cheap numpy counts)."""
    real = int(np.count_nonzero(batch["segment_ids"]))
    docs = int(np.count_nonzero(batch["inputs"] == bos_id)) if bos_id is not None else \
        int(np.count_nonzero((batch["positions"] == 0) & (batch["segment_ids"] > 0)))
    return {"real_tokens": real, "slots": batch["segment_ids"].size, "documents": docs}


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving `step`; the CLI exits with
    preemption.PREEMPTED_EXIT_CODE and running the command again resumes."""

    def __init__(self, step: int, path: pathlib.Path):
        super().__init__(f"preempted: checkpoint of step {step} saved at {path}; "
                         f"run the same command again to resume")
        self.step = step


class NonFiniteLoss(Exception):
    """A non-finite loss or gradient under train.nonfinite="stop"."""


def check_finite(state: dict, seen: int, since_step: int, step: int, policy: str,
                 checkpointer: checkpoint_lib.Checkpointer, say) -> int:
    """Reads the state's count of non-finite steps (at log and save points only) and stops
    under the "stop" policy, before the state could be saved."""
    count = int(jax.device_get(state["nonfinite_steps"]))
    if count > seen:
        where = f"{count - seen} step(s) in ({since_step}, {step}]"
        if policy == "stop":
            latest = checkpointer.latest_step()
            raise NonFiniteLoss(
                f"non-finite loss or gradients in {where}; stopped without saving (train.nonfinite"
                f"=stop). Last good checkpoint: {latest if latest is not None else 'none'}")
        say(f"\nwarning: non-finite loss or gradients in {where}; "
            f"{'update skipped' if policy == 'skip' else 'update applied'} (train.nonfinite={policy})")
    return count


def restore_or_init(cfg: ml_collections.ConfigDict, trainer: step_lib.Trainer,
                    checkpointer: checkpoint_lib.Checkpointer, data_iter, say) -> dict:
    """The workdir's newest good checkpoint (state and data position), else a fresh state,
    with parameters from `checkpoint.init_from` when it is set."""
    spec = trainer.spec
    restored = checkpointer.restore_latest(spec.abstract)
    if restored is not None:
        step, state, data_state, _ = restored
        data_iter.set_state(data_state)
        say(f"resumed from {checkpointer.directory / str(step)}")
        return state
    state = state_lib.init_state(cfg.model, trainer.tx, spec, seed=cfg.train.seed)
    if cfg.checkpoint.init_from:
        state["params"] = checkpoint_lib.restore_params(cfg.checkpoint.init_from,
                                                        spec.abstract["params"])
        say(f"parameters from {cfg.checkpoint.init_from}; fresh optimizer, step 0")
    return state


def to_global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Each process contributes its own rows; the result is one array sharded over the mesh."""
    s = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, v) for k, v in local.items()}


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Trains to `cfg.train.steps`, resuming from the workdir's latest checkpoint.
    Returns the logged metrics."""
    # ---- config and mesh ------------------------------------------------------------
    config_lib.validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    is_writer = jax.process_index() == 0
    say = print if is_writer else (lambda *a, **k: None)
    # Before any loader thread starts: on CPU the peak is measured on this host's cores.
    peak, peak_source = metrics_lib.peak_flops(cfg.metrics.peak_flops)

    # ---- workdir --------------------------------------------------------------------
    workdir = pathlib.Path(workdir)
    check_workdir(workdir)

    # ---- input ----------------------------------------------------------------------
    tokenizer = tokenizers.load_tokenizer(cfg.data)
    cfg = config_lib.resolved(cfg, tokenizer.vocab_size, jax.device_count())
    data_stats = prepare_sources(cfg.data)
    for name, stats in data_stats.items():
        say(f"source {name}: {stats['train_documents']:,} train / {stats['validation_documents']:,} "
            f"validation documents; {stats['empty_skipped']:,} empty skipped; "
            f"{stats['invalid_utf8_replaced']:,} with invalid UTF-8 replaced")
    if is_writer:
        tokenizer.save(workdir / "tokenizer")  # the run describes itself: generation needs it
    # This process reads the rows of the global batch its devices hold: the batch does not
    # depend on the process count.
    rows = distributed.local_rows(sharding.batch_sharding(mesh), cfg.data.global_batch_size)
    data_iter = pipeline.make_iterator(cfg.data, split="train", rows=rows, tokenizer=tokenizer)

    # ---- model, optimizer, sharded state ---------------------------------------------
    total_steps = cfg.train.steps
    with jax.set_mesh(mesh), sharding.axis_rules():
        trainer = step_lib.build_trainer(cfg.model, cfg.optim, total_steps, mesh, cfg.train.seed,
                                         cfg.train.nonfinite)
        spec = trainer.spec

        # ---- compile (ahead of time, so step timings never include it) ---------------
        start = time.perf_counter()
        batch_shape = step_lib.abstract_batch(cfg.data.global_batch_size, cfg.data.seq_len, mesh)
        compiled_step = trainer.step.lower(spec.abstract, batch_shape).compile()
        compile_s = time.perf_counter() - start

        # ---- restore or initialise --------------------------------------------------
        checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint)
        checkpointer.check_capacity(checkpoint_lib.state_nbytes(spec.abstract))
        state = restore_or_init(cfg, trainer, checkpointer, data_iter, say)
    metadata = checkpoint_lib.run_metadata(cfg, spec.param_axes, tokenizer.name)

    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = metrics_lib.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    say(f"model: {cfg.model.family}, {param_count(cfg.model):,} parameters; mesh "
        f"{dict(mesh.shape)}; {tokens_per_step:,} tokens/step; compiled in {compile_s:.1f}s; "
        f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    # ---- loop -----------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir, cfg.metrics.tensorboard, active=is_writer)
    logged: list[dict[str, Any]] = []
    window = {"real_tokens": 0, "slots": 0, "documents": 0}  # this host, since the last log
    first_step = int(jax.device_get(state["step"])) + 1
    nonfinite_seen = int(jax.device_get(state["nonfinite_steps"]))
    last_log_time, last_log_step = time.perf_counter(), first_step - 1
    run_start = last_log_time
    try:
        with preemption.PreemptionWatch() as watch:
            for step in range(first_step, total_steps + 1):
                host_batch = next(data_iter)
                for key, value in batch_stats(host_batch, tokenizer.bos_id).items():
                    window[key] += value
                state, step_metrics = compiled_step(state, to_global_batch(host_batch, mesh))

                is_log = step % cfg.train.log_every == 0 or step == total_steps
                stop = watch.should_stop(step)
                is_save = checkpointer.should_save(step, total_steps, check_clock=is_log) or stop
                if is_log or is_save:  # the only places the host waits for the device
                    nonfinite_seen = check_finite(state, nonfinite_seen, last_log_step, step,
                                                  cfg.train.nonfinite, checkpointer, say)
                if is_log:
                    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    now = time.perf_counter()
                    step_time = (now - last_log_time) / (step - last_log_step)
                    scalars["step_time_s"] = step_time
                    scalars["tokens_per_sec"] = tokens_per_step / step_time
                    scalars["mfu"] = flops_per_step / step_time / peak
                    scalars["nonfinite_steps"] = nonfinite_seen
                    # Data figures of this host's share, over the steps since the last log.
                    scalars["data_documents"] = window["documents"]
                    scalars["data_tokens"] = window["real_tokens"]
                    scalars["packing_efficiency"] = window["real_tokens"] / max(window["slots"], 1)
                    window = dict.fromkeys(window, 0)
                    writer.write(step, scalars)
                    logged.append({"step": step, **scalars})
                    eta = (now - run_start) / (step - first_step + 1) * (total_steps - step)
                    metrics_lib.print_progress(
                        metrics_lib.progress_line(step, total_steps, scalars, eta), is_writer)
                    last_log_time, last_log_step = time.perf_counter(), step
                if is_save:  # every process's data position: one state for any process count
                    data_states = distributed.allgather_json(data_iter.get_state())
                    checkpointer.save(step, state, pipeline.merge_states(data_states), metadata)
                if stop:
                    checkpointer.wait()
                    raise Preempted(step, checkpointer.directory / str(step))
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        data_iter.close()
    say(f"\ndone: {total_steps} steps; checkpoints in {checkpointer.directory}")
    return logged
