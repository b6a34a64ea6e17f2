"""SFT data: JSONL conversations -> token ids with a loss mask -> packed rows.

Each line is one example, either

    {"prompt": "...", "response": "..."}                 (user turn, assistant turn)
    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

rendered through a chat template (templates.py): loss only on the trained roles' tokens
(the assistant's, by default) and the final EOS.

Lengths: an example takes len(ids) slots of a row of seq_len + 1 tokens (inputs and targets
are the row shifted by one). An example whose prompt alone (the tokens before its first
trained token) leaves no trained target inside seq_len is an error naming its line, or with
finetune.overlong="skip" it is skipped and counted. A longer example whose prompt fits is
cut at seq_len + 1 tokens (its response is truncated; counted).

Packing: examples are placed best-fit-decreasing into rows, each with its own segment id
(1, 2, ...; 0 = padding) and positions from 0, so no example attends to another (the
attention mask follows segment ids) or learns from one (a target counts only inside its
own example and only where the mask is set).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.data.tokenizers import Tokenizer
from jaxlm.finetune.records import DataError, Record
from jaxlm.finetune.templates import ChatTemplate


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32
    mask: np.ndarray  # bool: the token is a trained target
    where: str


@dataclasses.dataclass
class Counts:
    examples: int = 0
    skipped_overlong: int = 0
    truncated: int = 0


def conversation(record: Record, template: ChatTemplate) -> list[tuple[str, str]]:
    """The record's (role, content) messages; DataError naming its line if malformed."""
    value, where = record.value, record.where
    if "messages" in value:
        messages = value["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                    not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string "
                                f"\"role\" and \"content\"")
            if m["role"] not in template.roles:
                raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r}; the "
                                f"template knows {sorted(template.roles)}")
            out.append((m["role"], m["content"]))
        if not any(role in template.train_roles for role, _ in out):
            raise DataError(f"{where}: no {'/'.join(template.train_roles)} message: nothing to "
                            f"learn from")
        return out
    if "prompt" in value or "response" in value:
        for key in ("prompt", "response"):
            if not isinstance(value.get(key), str):
                raise DataError(f"{where}: \"{key}\" must be a string"
                                + ("" if key in value else " (missing)"))
        return [("user", value["prompt"]), ("assistant", value["response"])]
    raise DataError(f"{where}: expected \"messages\" or \"prompt\" and \"response\", got keys "
                    f"{sorted(value)}")


def load_examples(records: list[Record], template: ChatTemplate, tokenizer: Tokenizer,
                  seq_len: int, overlong: str) -> tuple[list[Example], Counts]:
    """Renders every record; applies the length policy (module docstring)."""
    row_len = seq_len + 1
    examples, counts = [], Counts()
    for record in records:
        ids, mask = template.render(conversation(record, template), tokenizer)
        trained = np.flatnonzero(mask)
        prompt_len = int(trained[0])  # the render always trains at least EOS or a reply
        if prompt_len > seq_len:
            if overlong == "skip":
                counts.skipped_overlong += 1
                continue
            raise DataError(f"{record.where}: the prompt alone is {prompt_len} tokens, longer "
                            f"than data.seq_len={seq_len}: nothing of the response would be "
                            f"trained (shorten it, raise seq_len, or set "
                            f"config.finetune.overlong=skip)")
        if len(ids) > row_len:
            ids, mask = ids[:row_len], mask[:row_len]
            counts.truncated += 1
        examples.append(Example(ids, mask, record.where))
        counts.examples += 1
    return examples, counts


def assemble(pieces: list[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One row of seq_len + 1 slots holding `pieces`, shifted into the step's arrays."""
    row_len = seq_len + 1
    tokens = np.zeros(row_len, np.int32)
    segments = np.zeros(row_len, np.int32)
    positions = np.zeros(row_len, np.int32)
    trained = np.zeros(row_len, bool)
    filled = 0
    for segment, ex in enumerate(pieces, start=1):
        end = filled + len(ex.ids)
        tokens[filled:end], trained[filled:end] = ex.ids, ex.mask
        segments[filled:end] = segment
        positions[filled:end] = np.arange(len(ex.ids))
        filled = end
    # A target counts inside its own example only, and only where the template trains it.
    weights = trained[1:] & (segments[1:] == segments[:-1]) & (segments[1:] != 0)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": segments[:-1],
            "positions": positions[:-1], "weights": weights.astype(np.float32)}


def pack(examples: list[Example], seq_len: int, packing: bool = True) -> dict[str, np.ndarray]:
    """Rows (N x seq_len arrays) of the examples: best-fit decreasing when packing, else one
    example per row. Deterministic: the same examples give the same rows."""
    if not examples:
        raise DataError("no examples left to train on (all skipped?)")
    if not packing:
        rows = [[ex] for ex in examples]
    else:
        row_len = seq_len + 1
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
        rows: list[list[Example]] = []
        free: list[int] = []
        by_free: list[list[int]] = [[] for _ in range(row_len + 1)]  # free slots -> rows
        nonempty = np.zeros(row_len + 1, bool)
        for i in order:
            size = len(examples[i].ids)
            fits = np.flatnonzero(nonempty[size:])
            if fits.size:  # the fullest row it fits in
                slots = size + int(fits[0])
                r = by_free[slots].pop(0)
                nonempty[slots] = bool(by_free[slots])
            else:
                r = len(rows)
                rows.append([])
                free.append(row_len)
            rows[r].append(examples[i])
            free[r] -= size
            by_free[free[r]].append(r)
            nonempty[free[r]] = True
    built = [assemble(r, seq_len) for r in rows]
    return {k: np.stack([b[k] for b in built]) for k in built[0]}
