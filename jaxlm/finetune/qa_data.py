"""Extractive question answering data: SQuAD-style JSONL -> one padded row per example, the
answer as a token span of the context, and what evaluation needs to turn a predicted span
back into text.

    {"question": "How old is Bob?", "context": "Ann lives in Oslo. Bob is 34 years old.",
     "answers": {"text": ["34"], "answer_start": [26]}}

Field names are finetune.question_field, context_field and answers_field; answer_start is a
character offset into the context, and the context must hold the text there.

A row is [start] question [end] context [end] (the tokenizer's `start_ids()` and `end_ids()`:
[CLS] q [SEP] c [SEP] for BERT's, BOS q EOS c EOS for bytes), padded to data.seq_len; token
types are 0 up to the first [end] and 1 from the context on (when the model has two types,
else all 0). A context too long for the row is cut; an example whose answer is not inside
the kept context (or whose question leaves no room for any) is an error naming its line, or
with finetune.overlong="skip" it is skipped and counted.

Character offsets: the byte tokenizer's token i is byte i of the UTF-8 text (every byte of
a character maps to that character); a Hugging Face tokenizer gives them from the
`tokenizers` library. A tokenizer without offsets (SentencePiece) is one clear error. The
answer's characters [start, start + len) become the tokens that overlap them: the first and
the last token whose characters intersect the span (tokens of no characters never do).
Training targets the first answer; evaluation scores against every answer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlm.data.tokenizers import Tokenizer
from jaxlm.finetune.records import DataError, Record

ROW_KEYS = ("starts", "ends", "label_weights")  # per-row arrays; the rest are B x L


@dataclasses.dataclass(frozen=True)
class Fields:
    question: str
    context: str
    answers: str


@dataclasses.dataclass(frozen=True)
class Example:
    """What evaluation reads to score a row's predicted span."""

    where: str
    context: str
    golds: tuple[str, ...]
    offsets: np.ndarray  # K x 2 (int64): the characters of each kept context token
    context_start: int  # the row position of the first context token


@dataclasses.dataclass
class Counts:
    examples: int = 0
    skipped: int = 0  # the answer is not inside the kept context (overlong="skip")
    truncated: int = 0  # contexts cut to fit the row


def token_offsets(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids of `text` as tokenizer.encode gives them, int64 N x 2 character offsets
    [begin, end) of each token)."""
    if tokenizer.name == "byte":
        ids = tokenizer.encode(text)
        widths = np.asarray([len(ch.encode("utf-8")) for ch in text], np.int64)
        char_of_byte = np.repeat(np.arange(len(text), dtype=np.int64), widths)
        return ids, np.stack([char_of_byte, char_of_byte + 1], axis=1).reshape(-1, 2)
    if tokenizer.name == "hf":
        encoding = tokenizer._tok.encode(text, add_special_tokens=False)
        return (np.asarray(encoding.ids, np.int32).reshape(-1),
                np.asarray(encoding.offsets, np.int64).reshape(-1, 2))
    raise DataError(f"finetune.task=qa needs the character offsets of each token to find the "
                    f"answer in the context; the {tokenizer.name!r} tokenizer cannot give "
                    f"them (use a byte or Hugging Face tokenizer.json base)")


def char_span_to_tokens(offsets_Nx2: np.ndarray, begin: int, end: int) -> tuple[int, int] | None:
    """(first, last) token whose characters overlap [begin, end); None when none does."""
    overlap = (offsets_Nx2[:, 1] > begin) & (offsets_Nx2[:, 0] < end) & \
        (offsets_Nx2[:, 1] > offsets_Nx2[:, 0])
    hits = np.flatnonzero(overlap)
    return (int(hits[0]), int(hits[-1])) if hits.size else None


def parse(record: Record, fields: Fields) -> tuple[str, str, list[str], list[int]]:
    """(question, context, answer texts, answer starts); DataError naming the line and field."""
    value, where = record.value, record.where
    for key in (fields.question, fields.context):
        if not isinstance(value.get(key), str):
            raise DataError(f"{where}: {key!r} must be a string"
                            + ("" if key in value else " (missing)"))
    answers = value.get(fields.answers)
    if not isinstance(answers, dict):
        raise DataError(f"{where}: {fields.answers!r} must be an object "
                        f"{{\"text\": [...], \"answer_start\": [...]}}"
                        + ("" if fields.answers in value else " (missing)"))
    texts, starts = answers.get("text"), answers.get("answer_start")
    if not isinstance(texts, list) or not isinstance(starts, list) or not texts \
            or len(texts) != len(starts):
        raise DataError(f"{where}: {fields.answers!r} needs non-empty lists \"text\" and "
                        f"\"answer_start\" of the same length")
    context = value[fields.context]
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text or isinstance(start, bool) \
                or not isinstance(start, int):
            raise DataError(f"{where}: each answer needs a non-empty string text and an integer "
                            f"answer_start, got {text!r} at {start!r}")
        if start < 0 or context[start:start + len(text)] != text:
            raise DataError(f"{where}: the answer {text!r} is not at answer_start {start} of "
                            f"the context (found {context[max(start, 0):][:len(text)]!r})")
    return value[fields.question], context, texts, starts


def load_rows(records: Sequence[Record], tokenizer: Tokenizer, seq_len: int, fields: Fields,
              token_types: bool, overlong: str
              ) -> tuple[dict[str, np.ndarray], list[Example], Counts]:
    """(rows, the example of each row, counts). Rows: inputs, positions, segment_ids,
    token_types, context_mask (N x seq_len int32), starts and ends (N, int32: the first
    answer's token span in row positions) and label_weights (N, float32, all 1)."""
    start_ids, end_ids = tokenizer.start_ids(), tokenizer.end_ids()
    rows: list[tuple[np.ndarray, int, int, int, int]] = []  # ids, context start/len, span
    examples, counts = [], Counts()
    for record in records:
        question, context, texts, starts = parse(record, fields)
        prefix = np.concatenate([start_ids, tokenizer.encode(question), end_ids]).astype(np.int32)
        context_ids, offsets = token_offsets(tokenizer, context)
        budget = seq_len - len(prefix) - len(end_ids)
        span = char_span_to_tokens(offsets, starts[0], starts[0] + len(texts[0]))
        if span is None:
            raise DataError(f"{record.where}: the answer {texts[0]!r} covers no token of the "
                            f"context")
        if budget < 1 or span[1] >= budget:
            if overlong == "skip":
                counts.skipped += 1
                continue
            why = (f"the question alone takes {len(prefix)} of data.seq_len={seq_len} tokens"
                   if budget < 1 else f"the answer ends at context token {span[1]}, past the "
                   f"{budget} that fit data.seq_len={seq_len} after the question")
            raise DataError(f"{record.where}: {why} (shorten it, raise seq_len, or set "
                            f"config.finetune.overlong=skip)")
        kept = min(len(context_ids), budget)
        counts.truncated += int(kept < len(context_ids))
        counts.examples += 1
        ids = np.concatenate([prefix, context_ids[:kept], end_ids]).astype(np.int32)
        rows.append((ids, len(prefix), kept, len(prefix) + span[0], len(prefix) + span[1]))
        examples.append(Example(record.where, context, tuple(texts), offsets[:kept],
                                len(prefix)))
    if not rows:
        raise DataError("no examples left to train on (all skipped?)")
    return pad_rows(rows, seq_len, token_types), examples, counts


def pad_rows(rows: list[tuple[np.ndarray, int, int, int, int]], seq_len: int,
             token_types: bool) -> dict[str, np.ndarray]:
    n = len(rows)
    out = {k: np.zeros((n, seq_len), np.int32)
           for k in ("inputs", "segment_ids", "token_types", "context_mask")}
    out["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    out["starts"] = np.asarray([r[3] for r in rows], np.int32)
    out["ends"] = np.asarray([r[4] for r in rows], np.int32)
    out["label_weights"] = np.ones(n, np.float32)
    for i, (ids, context_start, kept, _, _) in enumerate(rows):
        out["inputs"][i, :len(ids)] = ids
        out["segment_ids"][i, :len(ids)] = 1
        out["context_mask"][i, context_start:context_start + kept] = 1
        if token_types:
            out["token_types"][i, context_start:len(ids)] = 1
    return out


def span_text(example: Example, start: int, end: int) -> str:
    """The context's characters of row positions start..end (inclusive), as SQuAD takes a
    prediction: the original text from the first token's begin to the last token's end."""
    first, last = start - example.context_start, end - example.context_start
    return example.context[example.offsets[first, 0]:example.offsets[last, 1]]
