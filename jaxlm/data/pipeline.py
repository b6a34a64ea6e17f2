"""The input pipeline: TFDS ArrayRecord sources -> grain -> packed, shifted numpy batches.

    sources (weighted mixture) -> shuffle + repeat (train) -> tokenize
        -> row streams: stream j of B (the global batch) mixes documents j, j+B, ... of
           each source and packs them into rows
        -> batch = one row from each of this process's streams -> prefetch (thread)

Reading row j of every batch from its own document stream keeps the rows of one batch
from B different places of the corpus (a single packed stream would fill a whole batch
from one or two long files). The order is global: every process shuffles every source
with the same seed and defines the same B streams, and materialises only the rows it
feeds (by default rows [p*B/P, (p+1)*B/P)), so the global batch at step k is the same
for any number of processes. Everything before packing is index based (grain
MapDataset), so the pipeline state is a few integers per stream, and the batch at step k
is a pure function of (seed, k, data config). An evaluation split is read once, in stored
order, as a single stream of packed rows dealt B to a batch: the same fixed batches every
time, every one full but the last, whatever the process count.

A record longer than data.max_document_bytes (only a TFDS catalog dataset's can be: local
sources are cut when built) is read whole, then cut into pieces that are tokenized and packed
one at a time, each its own document (jaxlm.data.longdocs); shorter records are tokenized
whole, as always.

The objective (config section `objective`, jaxlm.data.objectives) decides what a stream
makes of its documents:
    causal_lm        rows of seq_len + 1, shifted: inputs, targets, segment_ids, positions,
                     weights (B x seq_len). The state is exactly what it always was.
    masked_lm        rows of seq_len ([CLS] ... [SEP] documents, as the tokenizer's
                     `document`), each masked with a Generator seeded by (data.shuffle_seed,
                     stream, row number): the same five keys, inputs corrupted, targets the
                     original ids, weights 1 at the positions to predict.
    span_corruption  documents' text ids (no BOS, no EOS) cut into chunks, each corrupted
                     with a Generator seeded by (data.shuffle_seed, stream, document, piece,
                     chunk), packed into encoder/decoder row pairs
                     (jaxlm.data.seq2seq_packing): inputs, input_segment_ids,
                     input_positions (B x seq_len); decoder_inputs, targets, segment_ids,
                     positions, weights (B x targets_len).
The state's meta records the objective (not for causal LM, whose states stay as they were),
so a run never resumes its data under another objective.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm.config.schema import DEFAULT_MAX_DOCUMENT_BYTES
from jaxlm.data import longdocs, objectives, sources, tokenizers
from jaxlm.data.packing import PackedRows, SeededRows, shift_row
from jaxlm.data.seq2seq_packing import PackedPairs, SpanCorruptedExamples, empty_pair
from jaxlm.errors import ConfigError

Batch = dict[str, np.ndarray]
# Version of the data-order function. Bump it whenever a change would alter which tokens
# a given (seed, step, config) yields; a checkpoint saved under another version is refused
# instead of silently continuing in a different order. Version 3: streams defined over the
# global batch (version 2 sharded documents per process first; with one process the two
# orders are the same, so such a state is still accepted there).
_STATE_VERSION = 3


class _Tokenize:
    """Record -> [BOS] text [EOS] int32 (BOS when the tokenizer `adds_bos`, EOS when it has
    one: the document separator); with `text_only`, the text's ids alone; empty -> empty
    array.

    A record longer than `max_document_bytes` (UTF-8) becomes a `longdocs.SplitRecord`: its
    pieces, each tokenized so only when the packer reaches it. (Local sources are split when
    built; only a catalog dataset's records can be this long here.)"""

    def __init__(self, tokenizer: tokenizers.Tokenizer,
                 max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES, text_only: bool = False):
        self._tok = tokenizer
        self._limit = max_document_bytes
        self._text_only = text_only

    def __call__(self, record: dict[str, Any]) -> np.ndarray | longdocs.SplitRecord:
        text = data = record["text"]
        if isinstance(text, str) and len(text) > self._limit // 4:  # may be too long
            data = text.encode("utf-8", "surrogatepass")
        if isinstance(data, bytes) and len(data) > self._limit:
            return longdocs.SplitRecord(data, self._limit, self._wrap_bytes)
        # TFDS decodes Text features to bytes without TensorFlow: skip a decode/encode trip.
        return self._wrap_bytes(text) if isinstance(text, bytes) else \
            self._wrap(self._tok.encode(text))

    def _wrap_bytes(self, text: bytes) -> np.ndarray:
        return self._wrap(self._tok.encode_bytes(text))

    def _wrap(self, ids: np.ndarray) -> np.ndarray:
        if not len(ids):
            return np.zeros(0, np.int32)
        return np.asarray(ids, np.int32) if self._text_only else self._tok.document(ids)


def _shifted(row: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Batch:
    return shift_row(*row)


def _same(example: Batch) -> Batch:
    return example


class _RowBatchIterator(grain.DatasetIterator):
    """One example (`to_example` of a stream's element) from each stream per batch;
    exhausted (finite) streams give `padding`."""

    def __init__(self, streams: list[grain.DatasetIterator], to_example, padding: Batch):
        super().__init__(streams)
        self._streams = streams
        self._to_example, self._padding = to_example, padding
        self._done = [False] * len(streams)

    def __next__(self) -> Batch:
        rows = []
        for j, stream in enumerate(self._streams):
            row = None
            if not self._done[j]:
                try:
                    row = next(stream)
                except StopIteration:
                    self._done[j] = True
            rows.append(self._padding if row is None else self._to_example(row))
        if all(self._done):
            raise StopIteration
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"streams": [s.get_state() for s in self._streams], "done": list(self._done)}

    def set_state(self, state: dict[str, Any]) -> None:
        for stream, saved in zip(self._streams, state["streams"], strict=True):
            stream.set_state(saved)
        self._done = [bool(d) for d in state["done"]]


class _DealtBatchIterator(grain.DatasetIterator):
    """An evaluation split's batches: one stream of rows (every document once, in stored
    order) dealt B at a time, batch k holding rows kB .. kB + B - 1 of which this process
    keeps its `rows`. Every batch is full but the last (whose missing rows are `padding`),
    and every process sees as many batches."""

    def __init__(self, stream: grain.DatasetIterator, rows: Sequence[int], global_batch: int,
                 to_example, padding: Batch):
        super().__init__([stream])
        self._stream, self._rows, self._global_batch = stream, list(rows), global_batch
        self._to_example, self._padding = to_example, padding
        self._done = False

    def __next__(self) -> Batch:
        dealt = []
        while not self._done and len(dealt) < self._global_batch:
            try:
                dealt.append(next(self._stream))
            except StopIteration:
                self._done = True
        if not dealt:
            raise StopIteration
        rows = [self._to_example(dealt[r]) if r < len(dealt) else self._padding
                for r in self._rows]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"stream": self._stream.get_state(), "done": self._done}

    def set_state(self, state: dict[str, Any]) -> None:
        self._stream.set_state(state["stream"])
        self._done = bool(state["done"])


class _RowBatches(grain.IterDataset):
    """A training split's batches (_RowBatchIterator) or, given `global_batch`, an
    evaluation split's (_DealtBatchIterator over the one stream)."""

    def __init__(self, streams: list[grain.IterDataset], to_example, padding: Batch,
                 dealt: tuple[Sequence[int], int] | None = None):
        super().__init__(streams)
        self._stream_datasets = streams
        self._to_example, self._padding = to_example, padding
        self._dealt = dealt

    def __iter__(self) -> grain.DatasetIterator:
        if self._dealt is not None:
            return _DealtBatchIterator(self._stream_datasets[0].__iter__(), *self._dealt,
                                       self._to_example, self._padding)
        return _RowBatchIterator([s.__iter__() for s in self._stream_datasets],
                                 self._to_example, self._padding)


class BatchIterator:
    """Infinite (train) or single-pass (other splits) iterator of packed numpy batches.

    Each batch (causal and masked LM): inputs, targets, segment_ids, positions (int32) and
    weights (float32), all of shape (len(rows), seq_len): row i is row `rows[i]` of the
    global batch. Span corruption's keys: the module docstring.
    `get_state()` is JSON-serialisable; `merge_states` joins the states of all processes
    into one that any process count can resume from.
    """

    def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any], rows: Sequence[int]):
        self._box = [dataset.__iter__()]
        self._meta = meta
        self.rows = list(rows)
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

    @property
    def meta(self) -> dict[str, Any]:
        """The settings that decide the batches (dataset, tokenizer, seq_len, seed, ...)."""
        return dict(self._meta)

    def get_state(self) -> dict[str, Any]:
        """Position after the last batch returned (not after what is prefetched), of this
        iterator's rows."""
        return {"version": _STATE_VERSION, "meta": dict(self._meta), "rows": list(self.rows),
                "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()` or `merge_states()` result from an iterator built with the
        same config; `state` must hold the position of every row this iterator reads."""
        if self._meta["split"] != "train":
            raise ValueError(f"the {self._meta['split']!r} split is read once from its start")
        state = _upgrade(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"data pipeline state version {state.get('version')!r} was written by another "
                f"data-order function (this jaxlm has version {_STATE_VERSION}): resuming would "
                f"read the data in a different order; use the jaxlm that wrote it or a new workdir")
        saved = state.get("meta", {})
        changed = {k: (saved.get(k), self._meta.get(k)) for k in {**saved, **self._meta}
                   if saved.get(k) != self._meta.get(k)}
        if changed:
            raise ValueError(f"data pipeline state was saved with different settings "
                             f"(saved, now): {changed}")
        where = {row: i for i, row in enumerate(state["rows"])}
        missing = [row for row in self.rows if row not in where]
        if missing:
            raise ValueError(f"data pipeline state holds rows {state['rows']} but this process "
                             f"reads rows {missing} too")
        grain_state = state["grain"]
        self._iterator.set_state(
            {"streams": [grain_state["streams"][where[row]] for row in self.rows],
             "done": [grain_state["done"][where[row]] for row in self.rows]})

    @staticmethod
    def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return merge_states(states)

    def progress(self, step: int) -> dict[str, float]:
        """No epoch figure: a mixture's sources run through their epochs at their own pace."""
        return {}

    def close(self) -> None:
        """Stops the background threads. Also done at exit and when garbage-collected."""
        self._finalizer()


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from the `get_state()` of every process: the position of each global row
    (rows read by several processes, as when the batch is replicated, agree)."""
    first = states[0]
    streams, done = {}, {}
    for state in states:
        if state["version"] != first["version"] or state["meta"] != first["meta"]:
            raise ValueError("data pipeline states of the processes disagree on their settings: "
                             f"{first['meta']} vs {state['meta']}")
        for i, row in enumerate(state["rows"]):
            streams[row] = state["grain"]["streams"][i]
            done[row] = state["grain"]["done"][i]
    rows = sorted(streams)
    return {"version": first["version"], "meta": first["meta"], "rows": rows,
            "grain": {"streams": [streams[r] for r in rows], "done": [done[r] for r in rows]}}


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A version 2 state of a single process as version 3 (the same data order)."""
    meta = state.get("meta", {})
    if state.get("version") != 2 or meta.get("process_count") != 1:
        return state
    batch = meta["local_batch"]
    meta = {k: v for k, v in meta.items() if k not in ("local_batch", "process_index", "process_count")}
    return {"version": 3, "meta": {**meta, "global_batch": batch}, "rows": list(range(batch)),
            "grain": state["grain"]}


def _close_box(box: list[grain.DatasetIterator]) -> None:
    while box:
        box.pop().close()  # and drop the last reference while modules are still alive


def make_iterator(data_cfg: ml_collections.ConfigDict, *, split: str = "train",
                  process_index: int = 0, process_count: int = 1,
                  rows: Sequence[int] | None = None,
                  tokenizer: tokenizers.Tokenizer | None = None,
                  objective_cfg: ml_collections.ConfigDict | None = None,
                  model_vocab_size: int | None = None) -> BatchIterator:
    """The batch iterator of the global batch's `rows` (default: process `process_index`'s
    equal share, rows [p*B/P, (p+1)*B/P) of B = data_cfg.global_batch_size) for `split`.

    Train is shuffled with `data_cfg.shuffle_seed`, reshuffled every epoch and repeats
    forever; other splits are read once in stored order as one packed stream dealt B rows
    per batch, so only the last batch has padding rows (_DealtBatchIterator).
    `objective_cfg` (config section `objective`; None: causal LM) decides the batches (module
    docstring); `model_vocab_size` (the resolved model.vocab_size) gives masked LM's mask
    and span corruption's sentinels when the tokenizer has none (ConfigError otherwise).
    Needs `sources.prepare(data_cfg, name)` to have run for every source of the mixture.
    """
    global_batch = data_cfg.global_batch_size
    if rows is None:
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
        if global_batch % process_count:
            raise ValueError(
                f"data.global_batch_size={global_batch} is not divisible by the "
                f"process count {process_count}")
        share = global_batch // process_count
        rows = range(process_index * share, (process_index + 1) * share)
    rows = [int(r) for r in rows]
    if not rows or len(set(rows)) != len(rows) or not all(0 <= r < global_batch for r in rows):
        raise ValueError(f"rows {rows} are not distinct rows of the global batch "
                         f"[0, {global_batch})")
    train = split == "train"
    tokenizer = tokenizer or tokenizers.load_tokenizer(data_cfg)
    objective = objectives.resolve(objective_cfg, data_cfg.seq_len, tokenizer, model_vocab_size)
    span_corruption = isinstance(objective, objectives.SpanCorruption)
    if span_corruption and data_cfg.packing != "concat":
        raise ConfigError(f"config.data.packing: {data_cfg.packing!r} is not available for "
                          f"objective.name='span_corruption', which packs its examples in order "
                          f"(as T5): use 'concat'")
    mixture = config_lib.parse_mixture(data_cfg.dataset)

    parts = []
    for i, (name, _) in enumerate(mixture):
        source = sources.load(data_cfg, name, split)
        ds = grain.MapDataset.source(source)
        if len(ds) == 0:
            raise ValueError(f"source {name!r} split {split!r} has no documents")
        if train:
            # shuffle-then-repeat: grain reseeds the shuffle per epoch (seed + epoch). Every
            # process shuffles the whole source alike: the order is global.
            ds = ds.shuffle(seed=data_cfg.shuffle_seed + 7919 * i).repeat(None)
        parts.append(ds)
    limit = sources.max_document_bytes(data_cfg)
    tokenize = _Tokenize(tokenizer, limit, text_only=span_corruption)
    weights = [w for _, w in mixture]

    def stream_documents(j: int) -> grain.MapDataset:
        """Training: documents j, j + B, ... of every source, mixed. (Mixing first and
        striding after would not do: grain mixes in a fixed periodic pattern, so a stride
        that is a multiple of its period gives a stream one source only.) Evaluation: the
        one stream, every document of every source once, in stored order."""
        if not train:
            return (parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
                    ).map(tokenize)
        shards = [part[j::global_batch] for part in parts]
        ds = shards[0] if len(shards) == 1 else grain.MapDataset.mix(shards, weights)
        return ds.map(tokenize)

    # Streams read synchronously inside the one prefetch thread below: B streams with
    # grain's default 16 reader threads each would swamp a host.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    seq_len, seed = int(data_cfg.seq_len), int(data_cfg.shuffle_seed)
    streams = []
    for j in (rows if train else [0]):
        documents = stream_documents(j).to_iter_dataset(read)
        if objective is None:
            streams.append(PackedRows(documents, seq_len + 1, data_cfg.packing))
        elif span_corruption:
            streams.append(PackedPairs(SpanCorruptedExamples(documents, objective, seed, j),
                                       seq_len, objective.targets_len, objective.decoder_start_id))
        else:
            streams.append(SeededRows(PackedRows(documents, seq_len, data_cfg.packing),
                                      objective.example, (seed, objective.seed_tag, j)))
    if objective is None:
        to_example, padding = _shifted, shift_row(*(np.zeros(seq_len + 1, np.int32),) * 3)
    elif span_corruption:
        to_example, padding = _same, empty_pair(seq_len, objective.targets_len)
    else:
        to_example, padding = _same, objective.padding(seq_len)
    it_ds = grain.experimental.ThreadPrefetchIterDataset(
        _RowBatches(streams, to_example, padding, None if train else (rows, global_batch)),
        prefetch_buffer_size=int(data_cfg.prefetch))

    return BatchIterator(it_ds, order_meta(data_cfg, split, tokenizer, objective), rows)


def order_meta(data_cfg: ml_collections.ConfigDict, split: str,
               tokenizer: tokenizers.Tokenizer, objective: Any = None) -> dict[str, Any]:
    """The settings that decide which tokens batch k holds (a BatchIterator's `meta`, saved
    with its state); `objective`: objectives.resolve's (None: causal LM)."""
    meta = {"dataset": data_cfg.dataset, "split": split, "tokenizer": tokenizer.fingerprint,
            "packing": data_cfg.packing, "seq_len": int(data_cfg.seq_len),
            "global_batch": int(data_cfg.global_batch_size),
            "shuffle_seed": int(data_cfg.shuffle_seed)}
    limit = sources.max_document_bytes(data_cfg)
    if limit != DEFAULT_MAX_DOCUMENT_BYTES:
        # Recorded only when it differs from the default: states saved before the key
        # existed (read with the default) stay valid.
        meta["max_document_bytes"] = limit
    if objective is not None:  # (causal LM: none, as states saved before objectives)
        meta["objective"] = objective.meta()
    return meta
