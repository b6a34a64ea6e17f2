"""`jaxlm eval`: a run's newest checkpoint evaluated by its own task on a split.

    jaxlm eval --workdir runs/tiny [--split validation] [--config.data.dataset=...]

The run's task (causal-LM pretraining, SFT, classification; built from the config saved
with the checkpoint) says what evaluation means: for a language model the mean
cross-entropy per target token and its perplexity over the split read once in stored
order; for a classifier its loss and accuracy. Only the groups of the state that
evaluation reads are restored (the parameters, or LoRA's adapters, plus a classifier's
head; a LoRA base is reloaded and checked against its recorded fingerprint).
"""

from __future__ import annotations

import os
import math
from typing import Any

from jaxlm.errors import NonFiniteLoss, UserError
from jaxlm.train.task import Task


def evaluate(task: Task, workdir: str | os.PathLike, split: str = "validation",
             max_batches: int | None = None) -> dict[str, Any]:
    """The task's figures for the newest checkpoint of `workdir` on `split`, with the split,
    what it is (`label`) and the checkpoint's path."""
    state, step_dir = task.restore_newest(workdir)
    figures = task.evaluate(state, split, max_batches)
    check_figures(figures, task.eval_label(split), step_dir)
    return {**figures, "split": split, "label": task.eval_label(split),
            "checkpoint": str(step_dir)}


def check_figures(figures: dict[str, Any], label: str, step_dir: os.PathLike) -> None:
    """Never a NaN loss printed as if it were a figure: an empty split is bad input, a
    non-finite loss over real targets is reported as such (exit 3)."""
    counted = figures.get("tokens", figures.get("examples"))
    if counted == 0:
        raise UserError(f"{label}: nothing to evaluate (0 targets in {figures['batches']} "
                        f"batches)")
    loss = figures.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise NonFiniteLoss(f"{label}: the loss of {step_dir} is {loss} over {counted:,.0f} "
                            f"targets: its parameters give non-finite logits")
