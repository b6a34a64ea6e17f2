"""Span corruption's row streams: documents -> corrupted examples -> encoder/decoder row
pairs, both resumable grain iterators.

- `SpanCorruptedExamples` cuts each document (its text ids; a `longdocs.SplitRecord`'s
  pieces one after the other) into chunks of `SpanCorruption.tokens_length` and corrupts
  each into (inputs, targets) with a Generator seeded by (seed, stream, document number,
  piece, chunk). Its state is the parent's state before the document plus (document
  number, piece, chunk): restoring re-reads one document.
- `PackedPairs` packs the examples in order, as t5x/seqio's pack: an example joins the
  current row pair when both its inputs (encoder row, data.seq_len) and its targets
  (decoder row, targets_len) fit, else the pair is emitted and the example starts the next.
  Each example is a segment (1, 2, ...; 0 padding) with positions from 0 in both rows; the
  decoder inputs are the targets shifted right within each segment, each segment starting
  with the decoder start id (T5: the pad id, 0). Its state is the parent's state before the
  example that did not fit: restoring re-reads that example.

A pair: inputs, input_segment_ids, input_positions (seq_len); decoder_inputs, targets,
segment_ids, positions (targets_len), int32; weights (targets_len, float32: 1 on every real
target token). Padding tokens are 0.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxlm.data.longdocs import SplitRecord
from jaxlm.data.objectives import SpanCorruption

Example = tuple[np.ndarray, np.ndarray]  # inputs, targets


class SpanCorruptedExamplesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: SpanCorruption, seed: int,
                 stream: int):
        super().__init__(parent)
        self._spec, self._seed, self._stream = spec, seed, stream
        self._doc: np.ndarray | SplitRecord | None = None
        self._doc_state: dict[str, Any] | None = None  # parent state just before _doc
        self._tokens: np.ndarray | None = None  # piece `_piece` of _doc
        self._number = 0  # of _doc (or of the next document) in the stream
        self._piece = 0
        self._chunk = 0  # the next chunk of the piece

    def __next__(self) -> Example:
        size = self._spec.tokens_length
        while True:
            if self._doc is None:
                self._doc_state = self._parent.get_state()
                self._doc = next(self._parent)  # StopIteration: the stream ended
            pieces = len(self._doc) if isinstance(self._doc, SplitRecord) else 1
            if self._piece < pieces:
                if self._tokens is None:
                    self._tokens = self._doc.tokens(self._piece) \
                        if isinstance(self._doc, SplitRecord) else self._doc
                start = self._chunk * size
                if start < len(self._tokens):
                    rng = np.random.default_rng([self._seed, self._spec.seed_tag, self._stream,
                                                 self._number, self._piece, self._chunk])
                    self._chunk += 1
                    return self._spec.example(self._tokens[start:start + size], rng)
                self._piece, self._chunk, self._tokens = self._piece + 1, 0, None
                continue
            self._doc, self._tokens = None, None
            self._number, self._piece, self._chunk = self._number + 1, 0, 0

    def get_state(self) -> dict[str, Any]:
        parent = self._parent.get_state() if self._doc is None else self._doc_state
        return {"parent": parent, "document": self._number, "piece": self._piece,
                "chunk": self._chunk}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._doc_state, self._tokens = None, None, None
        self._number, self._piece = int(state["document"]), int(state["piece"])
        self._chunk = int(state["chunk"])


class SpanCorruptedExamples(grain.IterDataset):
    """(inputs, targets) examples of the documents (text ids) of row stream `stream`."""

    def __init__(self, parent: grain.IterDataset, spec: SpanCorruption, seed: int, stream: int):
        super().__init__(parent)
        self._spec, self._seed, self._stream = spec, seed, stream

    def __iter__(self) -> SpanCorruptedExamplesIterator:
        return SpanCorruptedExamplesIterator(self._parent.__iter__(), self._spec, self._seed,
                                             self._stream)


def assemble_pair(examples: list[Example], inputs_len: int, targets_len: int,
                  decoder_start_id: int) -> dict[str, np.ndarray]:
    """One encoder/decoder row pair of `examples` (which fit), segments 1, 2, ..."""
    pair = {k: np.zeros(inputs_len, np.int32)
            for k in ("inputs", "input_segment_ids", "input_positions")}
    pair.update({k: np.zeros(targets_len, np.int32)
                 for k in ("decoder_inputs", "targets", "segment_ids", "positions")})
    used_inputs = used_targets = 0
    for segment, (inputs, targets) in enumerate(examples, start=1):
        end = used_inputs + len(inputs)
        pair["inputs"][used_inputs:end] = inputs
        pair["input_segment_ids"][used_inputs:end] = segment
        pair["input_positions"][used_inputs:end] = np.arange(len(inputs))
        used_inputs = end
        end = used_targets + len(targets)
        pair["targets"][used_targets:end] = targets
        pair["decoder_inputs"][used_targets] = decoder_start_id
        pair["decoder_inputs"][used_targets + 1:end] = targets[:-1]
        pair["segment_ids"][used_targets:end] = segment
        pair["positions"][used_targets:end] = np.arange(len(targets))
        used_targets = end
    pair["weights"] = (pair["segment_ids"] != 0).astype(np.float32)
    return pair


def empty_pair(inputs_len: int, targets_len: int) -> dict[str, np.ndarray]:
    """The pair of a row stream that has ended (finite splits): all padding."""
    return assemble_pair([], inputs_len, targets_len, 0)


class PackedPairsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, inputs_len: int, targets_len: int,
                 decoder_start_id: int):
        super().__init__(parent)
        self._inputs_len, self._targets_len = inputs_len, targets_len
        self._start = decoder_start_id
        self._held: Example | None = None  # read, did not fit the last pair: the next's first
        self._held_state: dict[str, Any] | None = None  # parent state just before _held

    def __next__(self) -> dict[str, np.ndarray]:
        examples, used_inputs, used_targets = [], 0, 0
        while True:
            if self._held is None:
                self._held_state = self._parent.get_state()
                try:
                    self._held = next(self._parent)
                except StopIteration:
                    self._held_state = None
                    break
            inputs, targets = self._held
            if len(inputs) > self._inputs_len or len(targets) > self._targets_len:
                raise ValueError(f"a span-corrupted example of {len(inputs)} inputs and "
                                 f"{len(targets)} targets tokens exceeds the rows "
                                 f"({self._inputs_len}, {self._targets_len})")
            if used_inputs + len(inputs) > self._inputs_len \
                    or used_targets + len(targets) > self._targets_len:
                break
            examples.append(self._held)
            used_inputs, used_targets = used_inputs + len(inputs), used_targets + len(targets)
            self._held = None
        if not examples:
            raise StopIteration
        return assemble_pair(examples, self._inputs_len, self._targets_len, self._start)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state() if self._held is None else self._held_state}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._held, self._held_state = None, None


class PackedPairs(grain.IterDataset):
    """Encoder/decoder row pairs of (inputs, targets) examples, packed in order."""

    def __init__(self, parent: grain.IterDataset, inputs_len: int, targets_len: int,
                 decoder_start_id: int):
        super().__init__(parent)
        self._lengths = (inputs_len, targets_len)
        self._start = decoder_start_id

    def __iter__(self) -> PackedPairsIterator:
        return PackedPairsIterator(self._parent.__iter__(), *self._lengths, self._start)

    def __str__(self) -> str:
        return f"PackedPairs(inputs_len={self._lengths[0]}, targets_len={self._lengths[1]})"
