"""The one training loop: any Task, top to bottom.

Sections: mesh; workdir; input; state layout and compile; restore or initialise; loop
(batch -> step -> metrics -> evaluation -> checkpoint). What the loop guarantees holds for
every task by construction:

- preemption: SIGTERM/SIGINT finish the step, save it and stop (every process the same
  step), `Preempted` -> exit 75; running the command again resumes;
- exact resume: the state and the data position are saved together, and the batch at a
  step does not depend on where the run was interrupted;
- non-finite policy: the step counts non-finite updates; the loop reads that count only
  at log, save and evaluation points (no extra host sync) and stops before saving under
  train.nonfinite="stop";
- one progress line, metrics.jsonl and TensorBoard for every task, data figures summed over
  every process's rows;
- evaluation during training for every task (train.eval_every, train.eval_batches) on
  batches of its own, so the training batches and the state never depend on it; the
  evaluations a caller hands in (`Evaluation`: the lm-evaluation-harness of
  train.lm_eval_every, which lives above this package) run on the same terms;
- the account of where the wall time went (jaxlm.train.goodput) in every log row and at
  the end, and a profiler trace of train.profile_steps (jaxlm.train.profiling);
- multi-host agreement on when to save (JAX's preemption sync point; checkpoint.every_minutes
  is consulted only at log points, where the processes sync anyway).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.checkpoint import lock as lock_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint import rundir
from jaxlm.checkpoint.manager import CheckpointStorageError
from jaxlm.data import tokenizers
from jaxlm.errors import ConfigError, NonFiniteLoss, Preempted, UserError
from jaxlm.parallel import distributed, rules
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import compat, goodput, preemption, profiling, wandb_writer
from jaxlm.train import metrics as metrics_lib
from jaxlm.train.task import Task


class TokenizerMismatchError(UserError):
    """The config's tokenizer is not the one the run was trained with."""


class Evaluation(Protocol):
    """An evaluation beside the task's own, run at its own cadence (at the start of a fresh
    run, every `every` steps and after the last; 0: never): `__call__(state)` gives its
    figures, named as metrics.jsonl keeps them. It reads the state and changes nothing."""

    every: int

    def __call__(self, state: dict) -> dict[str, float]: ...


def batch_stats(batch: dict[str, np.ndarray], bos_id: int | None) -> np.ndarray:
    """[documents started, real tokens, slots] of a host batch's (encoder's) input rows, or
    of both sides of preference pairs (cheap NumPy counts): a document starts at BOS, or
    (without one) where its positions start."""
    if "chosen_inputs" in batch:
        rows = [tuple(batch[f"{side}_{k}"] for k in ("inputs", "segment_ids", "positions"))
                for side in ("chosen", "rejected")]
    else:
        rows = [(batch["inputs"], batch.get("input_segment_ids", batch["segment_ids"]),
                 batch.get("input_positions", batch["positions"]))]
    out = np.zeros(3, np.int64)
    for inputs, segments, positions in rows:
        docs = int(np.count_nonzero(inputs == bos_id)) if bos_id is not None else \
            int(np.count_nonzero((positions == 0) & (segments > 0)))
        out += [docs, int(np.count_nonzero(segments)), segments.size]
    return out


def gathered(vector: np.ndarray) -> np.ndarray:
    """Every process's `vector`, one row each (a host collective: every process calls it)."""
    if jax.process_count() == 1:
        return vector[None]
    return np.asarray(multihost_utils.process_allgather(vector))


def summed_over_processes(counts: np.ndarray) -> np.ndarray:
    """`counts` added over every process (a host collective: every process calls it)."""
    return gathered(counts).sum(axis=0)


def check_finite(state: dict, seen: int, since_step: int, step: int, policy: str,
                 checkpointer: checkpoint_lib.Checkpointer, say) -> int:
    """Reads the state's count of non-finite steps (at log, save and evaluation points
    only) and stops under the "stop" policy, before the state could be saved."""
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


def take_workdir(workdir: pathlib.Path, lease_minutes: float, say) -> lock_lib.RunLock | None:
    """Process 0 takes the run's lock (jaxlm.checkpoint.lock); every process learns the
    outcome, so all stop alike when another run holds it."""
    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            check_writable(workdir)
            lock = lock_lib.RunLock(workdir, lease_minutes, say).acquire()
        except lock_lib.WorkdirLockedError as e:
            refusal = ("locked", str(e))
        except OSError as e:
            refusal = ("unwritable", f"workdir {workdir} is not writable: {e}")
    if jax.process_count() > 1:
        refusal = distributed.allgather_json(refusal)[0]
    if refusal is not None:
        kind, message = refusal
        raise (lock_lib.WorkdirLockedError if kind == "locked" else CheckpointStorageError)(message)
    return lock


def check_writable(workdir: pathlib.Path) -> None:
    """What a resumed run appends to later (metrics, TensorBoard events) is writable now,
    before anything is compiled: raises PermissionError naming it."""
    for name in ("metrics.jsonl", "metrics.superseded.jsonl", "goodput.jsonl", "tensorboard"):
        path = workdir / name
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))


def config_changes(task: Task, where: pathlib.Path, step: int, metadata: dict[str, Any]
                   ) -> list[dict[str, Any]]:
    """The run's recorded config changes, with those accepted now (jaxlm.train.compat);
    raises for changes the run forbids."""
    saved = rundir.config_of(metadata, where)
    return metadata.get("config_changes", []) + compat.check(saved, task.cfg, str(where), step)


def check_resume(task: Task, checkpointer: checkpoint_lib.Checkpointer,
                 workdir: pathlib.Path) -> None:
    """Before anything is written: the config and tokenizer now against the run's newest
    checkpoint (JSON only; the one restored later is checked again)."""
    latest = checkpointer.latest_metadata()
    if latest is None:
        return
    step, metadata = latest
    config_changes(task, checkpointer.directory / str(step), step, metadata)
    saved_dir = workdir / "tokenizer"
    if saved_dir.is_dir():
        saved = tokenizers.load_saved(saved_dir)
        now = task.tokenizer
        if compat.tokenizer_identity(saved) != compat.tokenizer_identity(now):
            raise TokenizerMismatchError(
                f"cannot resume {workdir}: it was trained with the tokenizer in {saved_dir} "
                f"({compat.describe_tokenizer(saved)}); this config's is "
                f"{compat.describe_tokenizer(now)}. "
                f"A run keeps its tokenizer: use the same one, or another --workdir")


def train(task: Task, workdir: str | os.PathLike, evaluations: Sequence[Evaluation] = ()
          ) -> list[dict[str, Any]]:
    """Trains `task` to its config's train.steps, resuming from the workdir's latest
    checkpoint. Returns the logged metrics (train steps; evaluations as eval_* keys, and
    those of `evaluations` as they name them)."""
    if task.cfg.model.weights != "float" and task.cfg.finetune.base_quant == "none":
        raise ConfigError(f"config.model.weights={task.cfg.model.weights!r}: a quantized run "
                          f"(`jaxlm quantize`) is for generation, evaluation and scoring; "
                          f"train its float run")
    account = goodput.Account(time.perf_counter())
    with preemption.watch() as watch:
        lock = None
        try:
            with watch.critical():
                lock = take_workdir(pathlib.Path(workdir), task.cfg.checkpoint.lock_lease_minutes,
                                    print if jax.process_index() == 0 else (lambda *a: None))
                if lock is not None:
                    watch.on_startup_exit(lock.release)
            with contextlib.ExitStack() as resources:  # closed last-opened first, however it ends
                logged, report = _run(task, pathlib.Path(workdir), watch, resources, account,
                                      evaluations)
        finally:
            if lock is not None:
                lock.release()
    report()  # the attempt's account, once its data, writers, checkpointer and lock are closed
    return logged


def _run(task: Task, workdir: pathlib.Path, watch: preemption.PreemptionWatch,
         resources: contextlib.ExitStack, account: goodput.Account,
         evaluations: Sequence[Evaluation]
         ) -> tuple[list[dict[str, Any]], Callable[[], None]]:
    """(the logged metrics, the report of the attempt's account to make after `resources`
    close: its wall time then counts the closing too)."""
    # ---- mesh -------------------------------------------------------------------------
    cfg = task.cfg
    mesh = mesh_lib.make_mesh(cfg.mesh)
    is_writer = jax.process_index() == 0
    say = print if is_writer else (lambda *a, **k: None)
    # Before any loader thread starts: on CPU the peak is measured on this host's cores.
    peak, peak_source = metrics_lib.peak_flops(cfg.metrics.peak_flops)

    # ---- the run: may it resume here? (read only) --------------------------------------
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint)
    resources.callback(checkpointer.close)
    check_resume(task, checkpointer, workdir)
    wandb_writer.check_installed(cfg.metrics)
    task.build(mesh)  # the state layout: abstract, nothing compiled or allocated
    checkpointer.check_capacity(checkpoint_lib.state_nbytes(task.spec.abstract))

    # ---- input ------------------------------------------------------------------------
    # This process reads the rows of the global batch its devices hold: the batch does not
    # depend on the process count.
    global_batch = cfg.data.global_batch_size
    rows = distributed.local_rows(rules.batch_sharding(mesh), global_batch)
    batches = task.train_batches(rows, say)
    resources.callback(batches.close)

    # ---- compile (ahead of time: step timings never include it), restore or initialise -
    total_steps = cfg.train.steps

    def compile_step():
        with mesh_lib.use(mesh):
            return task.lower().compile()

    with account.timing("compile"):
        compiled_step = preemption.responsive(compile_step)
    compile_s = account.seconds["compile"]
    with mesh_lib.use(mesh):
        restored = checkpointer.restore_latest(task.spec.abstract)
        changes: list[dict[str, Any]] = []
        if restored is not None:
            step0, state, data_state, saved_metadata = restored
            changes = config_changes(task, checkpointer.directory / str(step0), step0,
                                     saved_metadata)
            state = task.resume(state, saved_metadata)
            batches.set_state(data_state)
            say(f"resumed from {checkpointer.directory / str(step0)}")
        else:
            step0, state = None, task.init_state()
    accepted = [(c["key"], c["saved"], c["now"]) for c in changes if c["step"] == step0]
    if accepted:
        say("resuming with changed settings (train.allow_config_change):\n"
            + compat.table(accepted))
    metadata = {**task.metadata(), "config_changes": changes}
    tokens_per_step = global_batch * cfg.data.seq_len
    flops_per_step = task.flops_per_token() * tokens_per_step
    say(f"{task.describe()}; mesh {dict(mesh.shape)}; {tokens_per_step:,} tokens/step; "
        f"compiled in {compile_s:.1f}s; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    # ---- the first writes: the run is known to be this one -----------------------------
    with watch.critical():
        try:
            if is_writer and (step0 is None or not (workdir / "tokenizer").is_dir()):
                task.tokenizer.save(workdir / "tokenizer")  # the run describes itself
            writer = metrics_lib.MetricsWriter(workdir, cfg.metrics, active=is_writer,
                                               resumed_step=step0, run_config=cfg.to_dict())
        except OSError as e:
            raise CheckpointStorageError(f"workdir {workdir} is not writable: {e}") from e
    resources.callback(writer.close)
    # How far the attempt before got (the rows this one superseded): steps it redoes.
    lost = goodput.lost_to_restart(writer.superseded, step0)
    if jax.process_count() > 1:
        lost = tuple(distributed.allgather_json(lost)[0])
    account.set_lost(*lost)
    reached_before = (step0 or 0) + account.lost_steps
    first_step = int(jax.device_get(state["step"])) + 1
    profile = profiling.window(cfg.train, workdir, first_step, say)
    if profile is not None:
        resources.callback(profile.stop)
    account.since_start("startup")

    # ---- loop -------------------------------------------------------------------------
    logged: list[dict[str, Any]] = []
    last_eval: dict[str, float] = {}  # the latest evaluation, shown in the progress line
    eval_batches = cfg.train.eval_batches or None

    def own(state: dict) -> dict[str, float]:
        figures = task.evaluate(state, "validation", eval_batches)
        return {f"eval_{k}": v for k, v in figures.items()}

    cadences: list[tuple[int, Callable[[dict], dict[str, float]]]] = [
        (cfg.train.eval_every, own), *((e.every, e) for e in evaluations)]

    def due(step: int) -> list[Callable[[dict], dict[str, float]]]:
        """The evaluations of `step` (0: the start of a fresh run)."""
        return [run for every, run in cadences
                if every and (step in (0, total_steps) or step % every == 0)]

    def evaluate(step: int, runs: list[Callable[[dict], dict[str, float]]]) -> None:
        scalars: dict[str, float] = {}
        with account.timing("eval"):
            for run in runs:
                scalars.update(run(state))
        writer.write(step, scalars)
        logged.append({"step": step, **scalars})
        last_eval.update(scalars)
        metrics_lib.print_event(f"eval at step {step}: " + "  ".join(
            f"{k} {v:.4f}" for k, v in scalars.items()), is_writer)

    def announce_saves() -> None:
        for timing in checkpointer.finished_saves():
            metrics_lib.print_event(timing.describe(), is_writer)

    window = np.zeros(3, np.int64)  # documents, real tokens, slots of this host since the log
    document_start = task.tokenizer.bos_id if task.tokenizer.adds_bos else None
    nonfinite_seen = int(jax.device_get(state["nonfinite_steps"]))

    def paused() -> float:  # seconds of evaluation and saving: not the steps' time
        return account.seconds["eval"] + account.seconds["checkpoint"]

    try:
        if first_step == 1 and due(0):
            evaluate(0, due(0))
        last_log_time, last_log_step, last_paused = time.perf_counter(), first_step - 1, paused()
        eta = metrics_lib.Eta(total_steps)
        watch.start_loop(first_step, total_steps)
        for step in range(first_step, total_steps + 1):
            with account.timing("data"):
                host_batch = next(batches)
            window += batch_stats(host_batch, document_start)
            part = "recompute" if step <= reached_before else "step"
            with account.timing(part):
                with profile.step(step) if profile is not None else contextlib.nullcontext():
                    state, step_metrics = compiled_step(state, task.frozen,
                                                        task.to_global(host_batch))
                if profile is not None:
                    profile.after(step, state)

                # The run's first step is logged too: its loss before the first log_every steps.
                is_log = step % cfg.train.log_every == 0 or step in (first_step, total_steps)
                evaluations_now = due(step)
                stop = watch.should_stop(step)
                is_save = checkpointer.should_save(step, total_steps, check_clock=is_log) or stop
                if is_log or is_save or evaluations_now:  # the only places the host waits for the device
                    nonfinite_seen = check_finite(state, nonfinite_seen, last_log_step, step,
                                                  cfg.train.nonfinite, checkpointer, say)
                if is_log:
                    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            if is_log:
                now = time.perf_counter()
                step_time = (now - last_log_time - (paused() - last_paused)) / (step - last_log_step)
                documents, real, slots = summed_over_processes(window)
                window[:] = 0
                scalars.update(
                    step_time_s=step_time, tokens_per_sec=tokens_per_step / step_time,
                    mfu=flops_per_step / step_time / peak, nonfinite_steps=nonfinite_seen,
                    # Data figures of every process's rows, over the steps since the log.
                    data_documents=int(documents), data_tokens=int(real),
                    packing_efficiency=real / max(slots, 1), **batches.progress(step),
                    **goodput.figures(gathered(account.vector(now)), account.lost_steps,
                                      account.lost_before_s))
                writer.write(step, scalars)
                logged.append({"step": step, **scalars})
                announce_saves()
                metrics_lib.print_progress(
                    metrics_lib.progress_line(step, total_steps, {**scalars, **last_eval},
                                              eta.at(step, now)),
                    is_writer)
                last_log_time, last_log_step, last_paused = time.perf_counter(), step, paused()
            if evaluations_now:
                evaluate(step, evaluations_now)
            if is_save:  # every process's data position: one state for any process count
                with account.timing("checkpoint"):
                    data_states = distributed.allgather_json(batches.get_state())
                    checkpointer.save(step, state, batches.merge_states(data_states), metadata)
            if stop:
                with account.timing("checkpoint"):
                    checkpointer.wait()
                announce_saves()
                raise Preempted(step, checkpointer.directory / str(step))
        with account.timing("checkpoint"):
            checkpointer.wait()
        announce_saves()
    finally:
        checkpointer.wait()  # a save in flight completes, whatever ended the loop
    # ---- the account of the attempt ----------------------------------------------------
    def report() -> None:
        account_row = goodput.figures(gathered(account.vector(time.perf_counter())),
                                      account.lost_steps, account.lost_before_s)
        if is_writer:
            goodput.append(workdir, {"first_step": first_step, "last_step": total_steps,
                                      **account_row})
        say(f"\ndone: {total_steps} steps; checkpoints in {checkpointer.directory}\n"
            + goodput.summary(account_row))

    return logged, report
