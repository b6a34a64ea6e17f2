"""Packing token documents into fixed-length rows with segment ids and positions.

Both packers read a stream of int32 documents and emit rows of `row_len` tokens (causal
LM: seq_len + 1, and `shift_row` turns a row into (inputs, targets, segment_ids, positions,
weights); masked LM: seq_len).
Segment ids number the pieces of a row 1, 2, ... (0 = padding); positions restart at 0 at
every piece, so attention never crosses documents and RoPE restarts per document. A
document longer than a row is split into pieces, never dropped.

- `ConcatPacker` concatenates documents and cuts rows (no padding but at the end of a
  finite stream). Its state is the parent's state before the current document plus an
  offset into it: restoring re-reads one document.

A record longer than data.max_document_bytes reaches a packer as a `longdocs.SplitRecord`:
its pieces are documents one after the other. `ConcatPacker` tokenizes one piece at a time
(its state then also names the piece); `FirstFitPacker` takes every piece into its window.
- `FirstFitPacker` splits documents into pieces of at most `row_len`, then packs a window of
  `window` documents at a time first-fit-decreasing (longest piece first, into the first
  row with room) and emits the window's rows in a seeded random order (so full rows and
  packed remainders mix). Its state is the parent's state at the window start, the window's
  number and the rows already emitted: restoring re-reads and re-packs one window.

Masked LM reads the packed rows of data.seq_len (no shift) through `SeededRows`, which
masks each with a Generator seeded by the row's number in its stream. (Span corruption's
encoder/decoder rows: jaxlm.data.seq2seq_packing.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data.longdocs import SplitRecord

Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, segment ids, positions


def shift_row(tokens: np.ndarray, segments: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Row of seq_len + 1 tokens -> next-token example of seq_len. A target counts only if it
    continues the input's segment (not the next document's first token, not padding)."""
    weights = (segments[:-1] == segments[1:]) & (segments[1:] != 0)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": segments[:-1],
            "positions": positions[:-1], "weights": weights.astype(np.float32)}


def _assemble(pieces: list[np.ndarray], row_len: int) -> Row:
    tokens = np.zeros(row_len, np.int32)
    segments = np.zeros(row_len, np.int32)
    positions = np.zeros(row_len, np.int32)
    filled = 0
    for segment, piece in enumerate(pieces, start=1):
        end = filled + len(piece)
        tokens[filled:end] = piece
        segments[filled:end] = segment
        positions[filled:end] = np.arange(len(piece), dtype=np.int32)
        filled = end
    return tokens, segments, positions


class ConcatPacker(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, row_len: int):
        super().__init__(parent)
        self._row_len = row_len
        self._doc: np.ndarray | None = None  # the document the next row starts in
        self._doc_state: dict[str, Any] | None = None  # parent state just before _doc
        self._offset = 0  # tokens of _doc already emitted
        self._split: SplitRecord | None = None  # the record _doc is a piece of, if split
        self._piece = 0  # which piece

    def _next_doc(self, piece: int = 0) -> bool:
        """Loads the next non-empty document (from `piece` on, when it is a split record);
        False at the end of the stream."""
        while True:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                return False
            if isinstance(doc, SplitRecord):
                self._split, self._doc_state = doc, state
                if self._open_piece(piece):
                    return True
            elif len(doc):
                self._doc, self._doc_state, self._offset = doc, state, 0
                return True

    def _open_piece(self, piece: int) -> bool:
        """The first non-empty piece from `piece` on of the split record as _doc; False
        (and no split record) when none is left."""
        while piece < len(self._split):
            doc = self._split.tokens(piece)
            if len(doc):
                self._doc, self._piece, self._offset = doc, piece, 0
                return True
            piece += 1
        self._split = None
        return False

    def __next__(self) -> Row:
        pieces, filled = [], 0
        while filled < self._row_len:
            if self._doc is None and not self._next_doc():
                break
            take = min(self._row_len - filled, len(self._doc) - self._offset)
            pieces.append(self._doc[self._offset:self._offset + take])
            filled += take
            self._offset += take
            if self._offset == len(self._doc):
                self._doc = None  # (and the next piece of a split record, if any)
                if self._split is not None:
                    self._open_piece(self._piece + 1)
        if not pieces:
            raise StopIteration
        return _assemble(pieces, self._row_len)

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0, "in_doc": False}
        state = {"parent": self._doc_state, "offset": self._offset, "in_doc": True}
        if self._split is not None:
            state["piece"] = self._piece
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._doc_state, self._offset, self._split = None, None, 0, None
        if state["in_doc"]:
            piece = int(state.get("piece", 0))
            if not self._next_doc(piece) or piece != (self._piece if self._split else 0):
                raise ValueError("pipeline state points past the end of the data")
            self._offset = int(state["offset"])


def first_fit_decreasing(pieces: list[np.ndarray], row_len: int) -> list[list[np.ndarray]]:
    """Bins of total length <= row_len; longest piece first, each into the first bin with
    room. Ties keep stream order, so the result is deterministic."""
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
    bins: list[list[np.ndarray]] = []
    room: list[int] = []
    for i in order:
        n = len(pieces[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(pieces[i])
                room[b] -= n
                break
        else:
            bins.append([pieces[i]])
            room.append(row_len - n)
    return bins


class FirstFitPacker(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, row_len: int, window: int):
        super().__init__(parent)
        self._row_len = row_len
        self._window = window
        self._window_state = self._parent.get_state()
        self._window_index = -1  # number of the window in _rows
        self._rows: list[list[np.ndarray]] = []
        self._emitted = 0

    def _fill(self) -> None:
        self._window_state = self._parent.get_state()
        self._window_index += 1
        self._emitted = 0
        pieces = []
        for _ in range(self._window):
            try:
                doc = next(self._parent)
            except StopIteration:
                break
            parts = (doc.tokens(k) for k in range(len(doc))) if isinstance(doc, SplitRecord) \
                else (doc,)
            for part in parts:
                pieces.extend(part[i:i + self._row_len] for i in range(0, len(part), self._row_len))
        # Pieces filling a whole row need no search; only the remainders are packed.
        full = [[p] for p in pieces if len(p) == self._row_len]
        rows = full + first_fit_decreasing([p for p in pieces if len(p) < self._row_len],
                                           self._row_len)
        order = np.random.default_rng(self._window_index).permutation(len(rows))
        self._rows = [rows[i] for i in order]

    def __next__(self) -> Row:
        if self._emitted == len(self._rows):
            self._fill()
            if not self._rows:
                raise StopIteration
        row = self._rows[self._emitted]
        self._emitted += 1
        return _assemble(row, self._row_len)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._window_state, "window": self._window_index,
                "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        window = int(state["window"])
        self._rows, self._emitted = [], 0
        self._window_index = max(window, 0) - 1  # _fill() counts up to the saved window
        if window >= 0:  # else no window was read yet: the next call reads one
            self._fill()
            self._emitted = int(state["emitted"])


class PackedRows(grain.IterDataset):
    """Rows of `row_len` tokens from a document stream, packed by `method`."""

    def __init__(self, parent: grain.IterDataset, row_len: int, method: str, window: int = 64):
        super().__init__(parent)
        self._row_len, self._method, self._window = row_len, method, window

    def __iter__(self) -> grain.DatasetIterator:
        parent = self._parent.__iter__()
        if self._method == "concat":
            return ConcatPacker(parent, self._row_len)
        return FirstFitPacker(parent, self._row_len, self._window)

    def __str__(self) -> str:
        return f"PackedRows(row_len={self._row_len}, method={self._method})"


class SeededRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, fn: Callable[[Row, np.random.Generator], Any],
                 seed: Sequence[int]):
        super().__init__(parent)
        self._fn, self._seed = fn, [int(s) for s in seed]
        self._index = 0  # of the next row

    def __next__(self) -> Any:
        row = next(self._parent)
        rng = np.random.default_rng([*self._seed, self._index])
        self._index += 1
        return self._fn(row, rng)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "index": self._index}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._index = int(state["index"])


class SeededRows(grain.IterDataset):
    """`fn(row, rng)` of each row of a packed stream, `rng` a numpy Generator seeded by
    `seed` (a few ints: data seed, objective, row stream) and the row's number in the
    stream: masked LM's masking, deterministic and resumed exactly (the state is the
    parent's and the row number)."""

    def __init__(self, parent: grain.IterDataset, fn: Callable[[Row, np.random.Generator], Any],
                 seed: Sequence[int]):
        super().__init__(parent)
        self._fn, self._seed = fn, seed

    def __iter__(self) -> SeededRowsIterator:
        return SeededRowsIterator(self._parent.__iter__(), self._fn, self._seed)
