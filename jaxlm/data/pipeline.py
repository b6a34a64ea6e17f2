"""The input pipeline: TFDS ArrayRecord source -> grain -> packed, shifted numpy batches.

    source -> host shard -> shuffle + repeat (train) -> tokenize (threads)
           -> pack rows of seq_len + 1 tokens -> shift -> batch -> prefetch (thread)

Everything before packing is index based (grain MapDataset), so the pipeline state is a few
integers: the next document index plus where the next row starts inside its document.
"""

from __future__ import annotations

import weakref
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxlm.data import sources, tokenizers

Batch = dict[str, np.ndarray]
_STATE_VERSION = 1


class _PackIterator(grain.DatasetIterator):
    """Concatenate-then-split over a stream of token arrays, one shifted row per __next__.

    Each row holds `row_len` = seq_len + 1 consecutive tokens of the document stream; a
    document that does not fit continues at the start of the next row (positions restart at
    0 there). Only the end of a finite stream leaves padding. Rows are disjoint, so every
    token is seen exactly once per epoch.
    """

    def __init__(self, parent: grain.DatasetIterator, row_len: int):
        super().__init__(parent)
        self._row_len = row_len
        self._doc: np.ndarray | None = None  # the document the next row starts in
        self._doc_state: dict[str, Any] | None = None  # parent state just before _doc
        self._offset = 0  # tokens of _doc already emitted

    def _next_doc(self) -> bool:
        """Loads the next non-empty document; False at the end of the stream."""
        while True:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                return False
            if len(doc):
                self._doc, self._doc_state, self._offset = doc, state, 0
                return True

    def __next__(self) -> Batch:
        n = self._row_len
        tokens = np.zeros(n, np.int32)
        segments = np.zeros(n, np.int32)
        positions = np.zeros(n, np.int32)
        filled, segment = 0, 0
        while filled < n:
            if self._doc is None and not self._next_doc():
                break
            take = min(n - filled, len(self._doc) - self._offset)
            segment += 1
            tokens[filled:filled + take] = self._doc[self._offset:self._offset + take]
            segments[filled:filled + take] = segment
            positions[filled:filled + take] = np.arange(take, dtype=np.int32)
            filled += take
            self._offset += take
            if self._offset == len(self._doc):
                self._doc = None
        if filled == 0:
            raise StopIteration
        # A target counts only if it continues the input's document (not the next document's
        # BOS, not padding).
        weights = (segments[:-1] == segments[1:]) & (segments[1:] != 0)
        return {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "segment_ids": segments[:-1],
            "positions": positions[:-1],
            "weights": weights.astype(np.float32),
        }

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0, "in_doc": False}
        # Restoring re-reads one document rather than storing any tokens in the state.
        return {"parent": self._doc_state, "offset": self._offset, "in_doc": True}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._doc_state, self._offset = None, None, 0
        if state["in_doc"]:
            if not self._next_doc():
                raise ValueError("pipeline state points past the end of the data")
            self._offset = int(state["offset"])


class _PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, row_len: int):
        super().__init__(parent)
        self._row_len = row_len

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._row_len)

    def __str__(self) -> str:
        return f"PackIterDataset(row_len={self._row_len})"


class _Tokenize:
    """Record -> [BOS, text..., EOS] int32; empty documents -> empty array (packer skips)."""

    def __init__(self, tokenizer: tokenizers.ByteTokenizer):
        self._tok = tokenizer

    def __call__(self, record: dict[str, Any]) -> np.ndarray:
        text = record["text"]
        # TFDS decodes Text features to bytes without TensorFlow: skip a decode/encode trip.
        ids = self._tok.encode_bytes(text) if isinstance(text, bytes) else self._tok.encode(text)
        if not len(ids):
            return ids
        return np.concatenate([[self._tok.bos_id], ids, [self._tok.eos_id]]).astype(np.int32)


def _pad_batch(rows: int):
    """Pads a short final batch (finite splits only) with all-padding rows: fixed shapes."""
    def pad(batch: Batch) -> Batch:
        missing = rows - batch["inputs"].shape[0]
        if missing == 0:
            return batch
        return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()}
    return pad


class BatchIterator:
    """Infinite (train) or single-pass (other splits) iterator of packed numpy batches.

    Each batch: inputs, targets, segment_ids, positions (int32) and weights (float32), all
    of shape (local_batch, seq_len). `get_state()` is JSON-serialisable.
    """

    def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any]):
        self._box = [dataset.__iter__()]
        self._meta = meta
        # grain 0.2.18's prefetch iterator raises from __del__ when it outlives module
        # teardown at interpreter exit; closing and releasing it at exit avoids that.
        self._finalizer = weakref.finalize(self, _close_box, self._box)

    @property
    def _iterator(self) -> grain.DatasetIterator:
        if not self._box:
            raise ValueError("the data iterator is closed")
        return self._box[0]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """Position after the last batch returned (not after what is prefetched)."""
        return {"version": _STATE_VERSION, "meta": dict(self._meta),
                "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()` result from an iterator built with the same config."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported data pipeline state version {state.get('version')!r}")
        saved = state.get("meta", {})
        changed = {k: (saved.get(k), v) for k, v in self._meta.items() if saved.get(k) != v}
        if changed:
            raise ValueError(f"data pipeline state was saved with different settings "
                             f"(saved, now): {changed}")
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        """Stops the background threads. Also done at exit and when garbage-collected."""
        self._finalizer()


def _close_box(box: list[grain.DatasetIterator]) -> None:
    while box:
        box.pop().close()  # and drop the last reference while modules are still alive


def make_iterator(data_cfg: ml_collections.ConfigDict, *, split: str = "train",
                  process_index: int = 0, process_count: int = 1) -> BatchIterator:
    """The batch iterator of host `process_index` of `process_count` for `split`.

    Train is shuffled with `data_cfg.shuffle_seed`, reshuffled every epoch and repeats
    forever; other splits are read once in stored order, the last batch padded.
    Needs `sources.prepare(data_cfg.dataset, data_cfg.data_dir)` to have run.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if data_cfg.global_batch_size % process_count:
        raise ValueError(
            f"data.global_batch_size={data_cfg.global_batch_size} is not divisible by the "
            f"process count {process_count}")
    local_batch = data_cfg.global_batch_size // process_count
    train = split == "train"
    tokenizer = tokenizers.get_tokenizer(data_cfg.tokenizer)

    source = sources.load(data_cfg.dataset, data_cfg.data_dir, split)
    # Disjoint strided shards; sharding before shuffling keeps every host's epoch its own.
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"split {split!r} has {len(source)} records, too few for "
                         f"{process_count} processes")
    if train:
        # shuffle-then-repeat: grain reseeds the shuffle per epoch (seed + epoch).
        ds = ds.shuffle(seed=data_cfg.shuffle_seed).repeat(None)
    ds = ds.map(_Tokenize(tokenizer))
    threads = int(data_cfg.num_threads)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=8 * threads))  # documents read ahead
    it_ds = _PackIterDataset(it_ds, data_cfg.seq_len + 1)
    it_ds = it_ds.batch(local_batch, drop_remainder=False)
    if not train:
        it_ds = it_ds.map(_pad_batch(local_batch))
    it_ds = grain.experimental.ThreadPrefetchIterDataset(
        it_ds, prefetch_buffer_size=int(data_cfg.prefetch))

    meta = {"dataset": data_cfg.dataset, "split": split, "tokenizer": data_cfg.tokenizer,
            "seq_len": int(data_cfg.seq_len), "local_batch": local_batch,
            "shuffle_seed": int(data_cfg.shuffle_seed), "process_index": process_index,
            "process_count": process_count}
    return BatchIterator(it_ds, meta)
