"""Text-to-text data for an encoder-decoder: JSONL of input and target -> encoder/decoder
row pairs, several examples packed per pair as span corruption packs them.

    {"input": "the big dog sees a red cat", "target": "lo kano grana vidas na gato roso"}

Field names are finetune.input_field and finetune.target_field. An example's encoder tokens
are the input's ids + the tokenizer's `end_ids()` (EOS; T5 starts no sequence with a BOS),
its decoder targets the target's ids + EOS. Examples are packed in file order into pairs of
an encoder row (data.seq_len) and a decoder row (finetune.target_len, 0: data.seq_len): an
example joins the current pair while both its parts fit, else the pair is closed
(jaxlm.data.seq2seq_packing.assemble_pair: a segment id and positions from 0 per example
in both rows, decoder inputs = targets shifted right per example behind the decoder start
id). An example longer than either row is an error naming its line, or with
finetune.overlong="skip" it is skipped and counted.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlm.data.seq2seq_packing import assemble_pair
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.finetune.records import DataError, Record


@dataclasses.dataclass(frozen=True)
class Example:
    inputs: np.ndarray  # int32 encoder tokens, EOS last
    targets: np.ndarray  # int32 decoder targets, EOS last
    where: str


@dataclasses.dataclass
class Counts:
    examples: int = 0
    skipped: int = 0


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """An input's or a target's tokens: its ids + EOS (int32)."""
    return np.concatenate([tokenizer.encode(text), tokenizer.end_ids()]).astype(np.int32)


def load_examples(records: Sequence[Record], tokenizer: Tokenizer, input_field: str,
                  target_field: str, inputs_len: int, targets_len: int, overlong: str
                  ) -> tuple[list[Example], Counts]:
    examples, counts = [], Counts()
    for record in records:
        value = record.value
        for key in (input_field, target_field):
            if not isinstance(value.get(key), str):
                raise DataError(f"{record.where}: {key!r} must be a string"
                                + ("" if key in value else " (missing)"))
        inputs, targets = encode(tokenizer, value[input_field]), \
            encode(tokenizer, value[target_field])
        if len(inputs) > inputs_len or len(targets) > targets_len:
            if overlong == "skip":
                counts.skipped += 1
                continue
            raise DataError(
                f"{record.where}: {len(inputs)} input and {len(targets)} target tokens (EOS "
                f"included) do not fit data.seq_len={inputs_len} and finetune.target_len="
                f"{targets_len} (shorten it, raise them, or set config.finetune.overlong=skip)")
        examples.append(Example(inputs, targets, record.where))
        counts.examples += 1
    if not examples:
        raise DataError("no examples left to train on (all skipped?)")
    return examples, counts


def pack(examples: Sequence[Example], inputs_len: int, targets_len: int,
         decoder_start_id: int) -> dict[str, np.ndarray]:
    """Row pairs (N x inputs_len and N x targets_len arrays) of the examples, in order."""
    pairs, current, used_inputs, used_targets = [], [], 0, 0
    for ex in examples:
        if used_inputs + len(ex.inputs) > inputs_len or \
                used_targets + len(ex.targets) > targets_len:
            pairs.append(assemble_pair(current, inputs_len, targets_len, decoder_start_id))
            current, used_inputs, used_targets = [], 0, 0
        current.append((ex.inputs, ex.targets))
        used_inputs, used_targets = used_inputs + len(ex.inputs), used_targets + len(ex.targets)
    if current:
        pairs.append(assemble_pair(current, inputs_len, targets_len, decoder_start_id))
    return {k: np.stack([p[k] for p in pairs]) for k in pairs[0]}


def generation_rows(examples: Sequence[Example], inputs_len: int) -> dict[str, np.ndarray]:
    """One example per row for generation: encoder tokens and segment ids (1 real, 0
    padding), N x inputs_len."""
    n = len(examples)
    out = {"inputs": np.zeros((n, inputs_len), np.int32),
           "input_segment_ids": np.zeros((n, inputs_len), np.int32)}
    for i, ex in enumerate(examples):
        out["inputs"][i, :len(ex.inputs)] = ex.inputs
        out["input_segment_ids"][i, :len(ex.inputs)] = 1
    return out
