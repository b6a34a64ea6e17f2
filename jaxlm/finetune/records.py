"""JSONL records for fine-tuning: reading with errors that name file:line, and the
held-out split.

Blank lines are skipped. Anything else that is not one JSON object per line is an error
naming the file and line, raised before the model is built.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from jaxlm.data import jsonl
from jaxlm.errors import UserError


class DataError(UserError, ValueError):
    """Bad fine-tuning data; the message names file:line (or the file)."""


@dataclasses.dataclass(frozen=True)
class Record:
    where: str  # "path:line"
    value: dict[str, Any]


def read_jsonl(path: str | pathlib.Path) -> list[Record]:
    """Every record of a JSONL file (jaxlm.data.jsonl: invalid UTF-8 is an error here)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file (config.finetune.train_file / eval_file)")
    records = [Record(f"{path}:{lineno}", value) for lineno, value, _ in jsonl.objects(
        path, DataError, lambda lineno: f"{path}:{lineno}", strict_utf8=True)]
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def split_eval(records: list[Record], fraction: float, seed: int
               ) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded random `fraction` of the records (at least one) held out,
    both in file order."""
    if len(records) < 2:
        raise DataError(f"{records[0].where.rsplit(':', 1)[0]}: one record cannot be split into "
                        f"train and eval; add records or set config.finetune.eval_file")
    count = min(max(int(round(len(records) * fraction)), 1), len(records) - 1)
    held = set(np.random.default_rng(seed).permutation(len(records))[:count].tolist())
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])
