"""Preference data (finetune.task=dpo): JSONL pairs -> a chosen row and a rejected row each.

Each line is one pair, either

    {"prompt": "...", "chosen": "...", "rejected": "..."}        (user turn, two replies)
    {"chosen": [messages...], "rejected": [messages...]}         (two whole conversations,
                                                                  as SFT's "messages")

Each side is rendered through the SFT chat template (templates.py) with SFT's loss mask: its
log-probability sums the trained roles' tokens (the assistant's) and the final EOS. The
lengths follow SFT's rule (sft_data): a prompt longer than seq_len is an error naming its
line (finetune.overlong="skip": skipped and counted), a longer reply is cut (counted).

A pair is one row of each side (no packing): `chosen_*` and `rejected_*` hold inputs,
targets, segment_ids, positions and weights (seq_len each), `pair_weights` is 1 (0 for the
rows that pad an evaluation batch).
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.tokenizers import Tokenizer
from jaxlm.finetune import sft_data
from jaxlm.finetune.records import DataError, Record
from jaxlm.finetune.templates import ChatTemplate

SIDES = ("chosen", "rejected")
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def sides(record: Record) -> dict[str, Record]:
    """The record's two sides as SFT records; DataError naming its line if malformed."""
    value, where = record.value, record.where
    if not isinstance(value, dict) or not all(s in value for s in SIDES):
        raise DataError(f"{where}: expected \"chosen\" and \"rejected\" (and \"prompt\" when "
                        f"they are strings), got keys {sorted(value) if isinstance(value, dict) else value!r}")
    out = {}
    for side in SIDES:
        reply = value[side]
        if isinstance(reply, list):
            out[side] = Record(where=where, value={"messages": reply})
        elif isinstance(reply, str):
            if not isinstance(value.get("prompt"), str):
                raise DataError(f"{where}: \"prompt\" must be a string when \"{side}\" is one")
            out[side] = Record(where=where, value={"prompt": value["prompt"], "response": reply})
        else:
            raise DataError(f"{where}: \"{side}\" must be a string or a list of messages")
    if value["chosen"] == value["rejected"]:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are the same: nothing to prefer")
    return out


def load_rows(records: list[Record], template: ChatTemplate, tokenizer: Tokenizer,
              seq_len: int, overlong: str) -> tuple[dict[str, np.ndarray], sft_data.Counts]:
    """The rows of every pair (module docstring) and the counts of SFT's length rule."""
    rendered = {side: [] for side in SIDES}
    counts = sft_data.Counts()
    for record in records:
        pair = sides(record)
        examples = {}
        for side in SIDES:
            found, n = sft_data.load_examples([pair[side]], template, tokenizer, seq_len,
                                              overlong)
            counts.truncated += n.truncated
            examples[side] = found[0] if found else None
        if any(e is None for e in examples.values()):
            counts.skipped_overlong += 1
            continue
        for side in SIDES:
            rendered[side].append(sft_data.assemble([examples[side]], seq_len))
        counts.examples += 1
    if not counts.examples:
        raise DataError("no preference pairs left to train on (all skipped?)")
    rows = {}
    for side in SIDES:
        for key in ROW_KEYS:
            rows[f"{side}_{key}"] = np.stack([r[key] for r in rendered[side]])
    rows["pair_weights"] = np.ones(counts.examples, np.float32)
    return rows, counts
