"""Classification data: JSONL of text and label -> one padded row per example.

    {"text": "...", "label": 1}            (an integer in [0, num_labels))
    {"text": "...", "label": "positive"}   (one of finetune.label_names)

Field names are finetune.text_field and finetune.label_field. A row is [BOS] text [EOS]
(the tokenizer's, when it has them) padded to seq_len; "last" pooling reads the EOS. A
missing or unknown label is an error naming the line; a text longer than seq_len is an
error too, or skipped and counted with finetune.overlong="skip".
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.tokenizers import Tokenizer
from jaxlm.finetune.records import DataError, Record


def parse_label(record: Record, label_field: str, num_labels: int, names: tuple[str, ...]) -> int:
    value, where = record.value, record.where
    if label_field not in value:
        raise DataError(f"{where}: missing label {label_field!r}")
    label = value[label_field]
    if isinstance(label, str) and names:
        if label not in names:
            raise DataError(f"{where}: label {label!r} is not one of finetune.label_names "
                            f"{list(names)}")
        return names.index(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: label {label!r} must be an integer in [0, {num_labels})"
                        + ("" if names else " (or set finetune.label_names for string labels)"))
    if not 0 <= label < num_labels:
        raise DataError(f"{where}: label {label} is outside [0, {num_labels}) "
                        f"(finetune.num_labels={num_labels})")
    return label


def load_rows(records: list[Record], tokenizer: Tokenizer, seq_len: int, text_field: str,
              label_field: str, num_labels: int, names: tuple[str, ...], overlong: str
              ) -> tuple[dict[str, np.ndarray], int]:
    """(rows: inputs, positions, segment_ids N x seq_len, labels and label_weights N; the
    number of overlong texts skipped)."""
    tokens, labels, skipped = [], [], 0
    for record in records:
        text = record.value.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{record.where}: {text_field!r} must be a string"
                            + ("" if text_field in record.value else " (missing)"))
        label = parse_label(record, label_field, num_labels, names)
        ids = encode(tokenizer, text)
        if len(ids) > seq_len:
            if overlong == "skip":
                skipped += 1
                continue
            raise DataError(f"{record.where}: the text is {len(ids)} tokens, longer than "
                            f"data.seq_len={seq_len} (shorten it, raise seq_len, or set "
                            f"config.finetune.overlong=skip)")
        tokens.append(ids)
        labels.append(label)
    if not tokens:
        raise DataError("no examples left to train on (all skipped?)")
    return pad_rows(tokens, labels, seq_len), skipped


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """One example's ids before padding, int32: the tokenizer's start (`start_ids()`), the
    text, its EOS (when it has one). Training, evaluation and `jaxlm classify` all use it."""
    return tokenizer.document(tokenizer.encode(text))


def pad_rows(tokens: list[np.ndarray], labels: list[int], seq_len: int) -> dict[str, np.ndarray]:
    """inputs, positions, segment_ids (N x seq_len; segment 0 is padding), labels and
    label_weights (N, all 1) of examples no longer than seq_len."""
    n = len(tokens)
    rows = {"inputs": np.zeros((n, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
            "segment_ids": np.zeros((n, seq_len), np.int32),
            "labels": np.asarray(labels, np.int32), "label_weights": np.ones(n, np.float32)}
    for i, ids in enumerate(tokens):
        rows["inputs"][i, :len(ids)] = ids
        rows["segment_ids"][i, :len(ids)] = 1
    return rows
