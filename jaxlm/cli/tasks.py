"""Which task a config runs: pretraining with objective.name's objective (causal or masked
LM, span corruption) when `finetune.task` is empty, else the fine-tuning task it names. The
verbs that run a config (train, finetune, compile) and those that read a run (eval) build
their task here, and the training verbs the evaluations a run hands the loop beside its
task's own (train.lm_eval_every: the lm-evaluation-harness)."""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections

from jaxlm import config as config_lib
from jaxlm.checkpoint import rundir
from jaxlm.cli import extras
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import pretraining as pretraining_lib
from jaxlm.train.lm import CausalLM
from jaxlm.train.loop import Evaluation
from jaxlm.train.task import Task


def pretraining(cfg: ml_collections.ConfigDict, **kwargs) -> CausalLM:
    return pretraining_lib.task(cfg, **kwargs)


def finetuning(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
               **kwargs) -> FinetuneTask:
    return FinetuneTask(cfg, workdir, **kwargs)


def for_config(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
               **kwargs) -> Task:
    """The task of a config file's config (kwargs: the task's own, e.g. num_devices)."""
    if cfg.finetune.task:
        return finetuning(cfg, workdir, **kwargs)
    return pretraining(cfg, **kwargs)


def for_run(workdir: str | os.PathLike, overrides: Sequence[str] = ()) -> Task:
    """The task that wrote run `workdir`, from the config saved with its newest checkpoint
    (`--config.k=v` overrides on top), on a mesh that fits this host. A pretraining run
    uses the tokenizer it saved; a fine-tuning run its recorded base's."""
    cfg, _ = rundir.saved_config(workdir)
    config_lib.apply_overrides(cfg, overrides)
    cfg = mesh_lib.fit_mesh(cfg)
    cfg.distill.update(teacher="", cache="")  # a distilled run is read as the model it trained
    if cfg.finetune.task:
        return finetuning(cfg, workdir)
    return pretraining(cfg, tokenizer=rundir.load_tokenizer(workdir))


def evaluations(task: Task) -> list[Evaluation]:
    """What the loop evaluates beside the task's own: the harness's tasks when
    train.lm_eval_every is set (checked here: installed, every task known, the include
    path a directory; before anything compiles)."""
    train_cfg = task.cfg.train
    if not train_cfg.lm_eval_every:
        return []
    extras.require_harness("config.train.lm_eval_every")
    from jaxlm.infer import harness  # imports lm_eval: only when asked for

    manager = harness.task_manager(config_lib.lm_eval_tasks(train_cfg),
                                   train_cfg.lm_eval_include_path or None,
                                   "config.train.lm_eval_tasks",
                                   "config.train.lm_eval_include_path")
    return [harness.DuringTraining(task, manager)]
