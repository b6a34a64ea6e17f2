"""`jaxlm classify`: a trained classifier run's labels and probabilities for new text.

    jaxlm classify --workdir runs/classify_tiny --text "import os" --text "x = 1"
    jaxlm classify --workdir runs/classify_tiny --jsonl lines.jsonl [--json]

The run's own task (its saved config, its recorded base; a LoRA run's adapters applied as
in its evaluation) computes the head's logits of each text, encoded and padded exactly as
the training and evaluation rows are (classify_data), in batches of the run's
data.global_batch_size. A JSONL file gives the text in the run's finetune.text_field;
where a line also has a label (finetune.label_field), the accuracy over those lines is
reported, the figure `jaxlm eval` gives for the same examples.

Every input is read and checked (the run is a classifier, each text is a string that fits
data.seq_len) before the checkpoint is restored or anything is compiled.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import jax
import numpy as np

from jaxlm.config import finetune as finetune_section
from jaxlm.errors import UserError
from jaxlm.finetune import classify, classify_data, lora
from jaxlm.finetune import records as records_lib
from jaxlm.finetune import rows as rows_lib
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.parallel import mesh as mesh_lib


class ClassifyError(UserError, ValueError):
    """Bad `jaxlm classify` input; the message names the run, the file:line or the text."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    texts: list[str]
    where: list[str]  # "--text 1", "file.jsonl:3"
    labels: list[int | None]  # a JSONL line's label, when it has one


def check_classifier(cfg, step_dir: pathlib.Path) -> None:
    if cfg.finetune.task != "classify":
        what = f"finetune.task={cfg.finetune.task!r}" if cfg.finetune.task else "a pretraining run"
        raise ClassifyError(f"{step_dir} is not a classifier ({what}); `jaxlm classify` reads "
                            f"runs of finetune.task=classify")


def label_names(ft_cfg) -> list[str]:
    """The run's label names (finetune.label_names), or "0", "1", ... for integer labels."""
    return list(finetune_section.label_names(ft_cfg)) or \
        [str(i) for i in range(finetune_section.num_labels(ft_cfg))]


def from_texts(texts: Sequence[str]) -> Inputs:
    return Inputs(list(texts), [f"--text {i + 1}" for i in range(len(texts))],
                  [None] * len(texts))


def from_jsonl(path: str | os.PathLike, ft_cfg) -> Inputs:
    """Each line's text (finetune.text_field) and label (finetune.label_field, optional)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise ClassifyError(f"--jsonl {path}: no such file")
    texts, where, labels = [], [], []
    names = finetune_section.label_names(ft_cfg)
    count = finetune_section.num_labels(ft_cfg)
    for record in records_lib.read_jsonl(path):
        text = record.value.get(ft_cfg.text_field)
        if not isinstance(text, str):
            state = "is missing" if ft_cfg.text_field not in record.value else "is not a string"
            raise ClassifyError(f"{record.where}: the text field {ft_cfg.text_field!r} "
                                f"(the run's finetune.text_field) {state}")
        has_label = ft_cfg.label_field in record.value
        labels.append(classify_data.parse_label(record, ft_cfg.label_field, count, names)
                      if has_label else None)
        texts.append(text)
        where.append(record.where)
    return Inputs(texts, where, labels)


def encode_rows(inputs: Inputs, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """The rows the classifier reads (as its evaluation rows); a text longer than seq_len
    is an error naming it (nothing is truncated)."""
    tokens = []
    for text, where in zip(inputs.texts, inputs.where):
        ids = classify_data.encode(tokenizer, text)
        if len(ids) > seq_len:
            raise ClassifyError(f"{where}: the text is {len(ids)} tokens, longer than the "
                                f"run's data.seq_len={seq_len} (nothing is truncated)")
        tokens.append(ids)
    labels = [0 if label is None else label for label in inputs.labels]  # unread
    return classify_data.pad_rows(tokens, labels, seq_len)


def probabilities(task: FinetuneTask, state: dict, rows: dict[str, np.ndarray]) -> np.ndarray:
    """float64 N x C: softmax of the head's logits of each row."""
    graphdef, pooling, use_lora = task.eval_graphdef, task.cfg.finetune.pooling, task.lora

    @jax.jit
    def logits_fn(trainable, frozen, batch):
        params = lora.combine(frozen["params"], trainable["adapters"]) if use_lora \
            else trainable["params"]
        return classify.logits(graphdef, params, trainable["head"], batch, pooling)

    trainable = {g: state[g] for g in task.spec.groups}
    global_batch = task.cfg.data.global_batch_size
    pending = []
    with mesh_lib.use(task.mesh):
        for host in rows_lib.eval_batches(rows, global_batch, np.arange(global_batch)):
            pending.append(logits_fn(trainable, task.frozen, task.to_global(host)))
    logits_NxC = np.concatenate([np.asarray(x, np.float64) for x in jax.device_get(pending)])
    logits_NxC = logits_NxC[:len(rows["labels"])]
    shifted_NxC = np.exp(logits_NxC - logits_NxC.max(axis=1, keepdims=True))
    return shifted_NxC / shifted_NxC.sum(axis=1, keepdims=True)


def accuracy(probs_NxC: np.ndarray, labels: Sequence[int | None]) -> tuple[float, int] | None:
    """(accuracy, count) over the inputs that have a label; None when none has."""
    known = [(i, label) for i, label in enumerate(labels) if label is not None]
    if not known:
        return None
    correct = sum(int(np.argmax(probs_NxC[i]) == label) for i, label in known)
    return correct / len(known), len(known)
