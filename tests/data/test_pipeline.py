import collections
import itertools
import json

import grain
import ml_collections
import numpy as np
import pytest

from jaxlm import config
from jaxlm.data import packing, pipeline, sources
from jaxlm.data.tokenizers import ByteTokenizer

BOS, EOS = 1, 2
KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def data_cfg(data_dir, **overrides):
    cfg = config.defaults().data
    cfg.data_dir = data_dir
    cfg.update(overrides)
    return cfg


def take(it, n):
    batches = list(itertools.islice(it, n))
    it.close()
    return batches


def stack(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in KEYS}


def reference_rows(texts, seq_len, n_rows):
    """Plain-Python concatenate-then-split of `texts` (bytes) into shifted rows."""
    stream = []  # (token, document number)
    for doc, text in enumerate(texts):
        if text:
            stream += [(t, doc) for t in [BOS, *(b + 3 for b in text), EOS]]
    rows = {k: [] for k in KEYS}
    for r in range(n_rows):
        row = stream[r * (seq_len + 1):(r + 1) * (seq_len + 1)]
        row += [(0, None)] * (seq_len + 1 - len(row))  # padding
        tokens, segments, positions = [], [], []
        segment, position, previous = 0, 0, object()
        for token, doc in row:
            if doc is None:
                segment, position = 0, 0  # padding: segment 0, position 0
            elif doc != previous:
                segment, position = segment + 1, 0
            tokens.append(token)
            segments.append(segment)
            positions.append(position if doc is not None else 0)
            position, previous = position + 1, doc
        rows["inputs"].append(tokens[:-1])
        rows["targets"].append(tokens[1:])
        rows["segment_ids"].append(segments[:-1])
        rows["positions"].append(positions[:-1])
        rows["weights"].append([float(segments[i] == segments[i + 1] != 0)
                                for i in range(seq_len)])
    return {k: np.array(v) for k, v in rows.items()}


def assert_batches_equal(actual, expected):
    for k in KEYS:
        np.testing.assert_array_equal(actual[k], expected[k], err_msg=k)


def documents(batches, row):
    """The documents (bytes) of row `row` of every batch (one row stream), recovered from
    BOS ... EOS."""
    picked = slice(row, row + 1)
    rows = np.concatenate([np.concatenate([b["inputs"][picked], b["targets"][picked, -1:]], axis=1)
                           for b in batches])
    stream = rows[rows != 0]  # padding is the only id 0
    starts, ends = np.flatnonzero(stream == BOS), np.flatnonzero(stream == EOS)
    return [bytes((stream[s + 1:e] - 3).astype(np.uint8)) for s, e in zip(starts, ends)]


def load(data_dir, split):
    return sources.load(data_cfg(data_dir), "stdlib", split)


def shuffled_texts(data_dir, seed, n, stream=0, streams=1):
    """The first `n` documents of one row stream (documents stream, stream + streams, ...
    of the shuffled training order), read straight from grain."""
    source = load(data_dir, "train")
    ds = grain.MapDataset.source(source).shuffle(seed=seed)
    # index >= len(ds): the next epoch's shuffle
    return [ds[stream + streams * i]["text"] for i in range(n)]


def test_shapes_and_dtypes(stdlib_data_dir):
    (batch,) = take(pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=32,
                                                    global_batch_size=6)), 1)
    assert sorted(batch) == sorted(KEYS)
    for k in KEYS:
        assert batch[k].shape == (6, 32), k
        assert batch[k].dtype == (np.float32 if k == "weights" else np.int32), k


def test_packing_matches_reference(stdlib_data_dir):
    # Long rows so that several whole documents and document splits appear.
    seq_len, batch, steps = 2048, 8, 16
    it = pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=seq_len,
                                         global_batch_size=batch, shuffle_seed=3))
    batches = take(it, steps)
    for row in range(batch):  # row j of every batch is stream j: documents j, j + 8, ...
        actual = {k: np.stack([b[k][row] for b in batches]) for k in KEYS}
        texts = shuffled_texts(stdlib_data_dir, seed=3, n=20, stream=row, streams=batch)
        assert sum(len(t) + 2 for t in texts) > steps * (seq_len + 1)  # enough docs
        assert_batches_equal(actual, reference_rows(texts, seq_len, steps))
    everything = stack(batches)
    assert everything["segment_ids"].max() >= 2  # some row holds more than one document
    assert (everything["weights"] == 0).any() and not (everything["segment_ids"] == 0).any()


def test_packing_edge_cases_against_reference():
    # Empty documents, an exact fit, and one document spanning three rows.
    texts = [b"", b"abc", b"", b"x" * 20, b"defgh", b"", b"0123456", b"z"]
    seq_len = 8
    ds = grain.MapDataset.source([{"text": t} for t in texts])
    ds = ds.map(pipeline._Tokenize(ByteTokenizer())).to_iter_dataset()
    rows = [packing.shift_row(*r) for r in packing.PackedRows(ds, seq_len + 1, "concat")]
    n_tokens = sum(len(t) + 2 for t in texts if t)
    assert len(rows) == -(-n_tokens // (seq_len + 1))
    assert_batches_equal({k: np.stack([r[k] for r in rows]) for k in KEYS},
                         reference_rows(texts, seq_len, len(rows)))


def test_train_epochs_are_reshuffled_permutations(stdlib_data_dir):
    source = load(stdlib_data_dir, "train")
    n = len(source)
    ds = grain.MapDataset.source(source).shuffle(seed=0)
    paths = [ds[i]["path"] for i in range(2 * n)]
    first, second = paths[:n], paths[n:]
    assert sorted(first) == sorted(second) == sorted(source[i]["path"] for i in range(n))
    assert first != second
    assert first != [source[i]["path"] for i in range(n)]


def test_train_streams_cover_each_epoch_in_shuffled_order(stdlib_data_dir):
    # One whole epoch and the start of the next: every document exactly once per epoch,
    # stream j holding documents j, j + B, ... of the shuffled order (nothing lost or
    # duplicated across the epoch boundary).
    seq_len, batch = 2048, 8
    source = load(stdlib_data_dir, "train")
    n = len(source)
    per_stream = -(-n // batch) + 3
    # Streams read at different speeds: expect up to 3x as many documents as one epoch.
    texts = [shuffled_texts(stdlib_data_dir, 5, 3 * per_stream, stream=j, streams=batch)
             for j in range(batch)]
    longest = max(sum(len(t) + 2 for t in ts[:per_stream] if t) for ts in texts)
    batches = take(pipeline.make_iterator(data_cfg(
        stdlib_data_dir, seq_len=seq_len, global_batch_size=batch, shuffle_seed=5)),
        longest // (seq_len + 1))
    seen = []
    for j in range(batch):
        got = documents(batches, row=j)
        expected = [t for t in texts[j] if t]
        assert len(got) < len(expected) and got == expected[:len(got)], j
        seen.append(got)
    # The first epoch (shuffled positions 0..n-1) is exactly the split, once each.
    first_epoch = [texts[j][i] for j in range(batch) for i in range(per_stream) if j + batch * i < n]
    assert collections.Counter(t for t in first_epoch if t) == collections.Counter(
        source[i]["text"] for i in range(n) if source[i]["text"])
    assert all(len(got) >= per_stream - 3 for got in seen)  # every stream reached the epoch end


def test_first_fit_packs_tightly_and_keeps_every_token(stdlib_data_dir):
    seq_len, batch = 256, 8
    batches = list(pipeline.make_iterator(data_cfg(
        stdlib_data_dir, seq_len=seq_len, global_batch_size=batch, packing="first_fit"),
        split="validation"))
    source = load(stdlib_data_dir, "validation")
    texts = [source[i]["text"] for i in range(len(source))]
    # An evaluation split is one stream dealt 8 rows per batch: every batch is full but
    # the last, and the rows hold exactly the split's tokens (documents are split into
    # pieces and reordered, so compare multisets).
    assert all(np.count_nonzero(b["segment_ids"].any(axis=1)) == batch for b in batches[:-1])
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                           for b in batches])
    got = collections.Counter(rows[rows != 0].tolist())
    want = collections.Counter()
    for t in texts:
        if t:
            want.update([BOS, *(c + 3 for c in t), EOS])
    assert got == want
    # Segments are contiguous pieces with positions 0, 1, ... and weights inside them.
    b = batches[0]
    for row in range(batch):
        seg, pos = b["segment_ids"][row], b["positions"][row]
        for s_id in set(seg.tolist()) - {0}:
            idx = np.flatnonzero(seg == s_id)
            assert (np.diff(idx) == 1).all() and (pos[idx] == pos[idx[0]] + np.arange(len(idx))).all()


def test_first_fit_decreasing_against_reference():
    pieces = [np.arange(n) for n in (5, 9, 2, 7, 3, 1, 4)]
    bins = packing.first_fit_decreasing(pieces, 10)
    # Longest first: 9 -> bin0 (1 free), 7 -> bin1 (3 free), 5 -> bin2 (5), 4 -> bin2 (1),
    # 3 -> bin1 (0), 2 -> bin3 (8), 1 -> bin0 (0).
    assert [[len(p) for p in b] for b in bins] == [[9, 1], [7, 3], [5, 4], [2]]


def test_first_fit_fills_98_percent_of_slots_on_the_default_corpus(stdlib_data_dir):
    # Rows of a window come in random order, so 400 batches are a fair sample.
    batches = take(pipeline.make_iterator(data_cfg(
        stdlib_data_dir, seq_len=256, global_batch_size=16, packing="first_fit")), 400)
    everything = stack(batches)
    assert np.count_nonzero(everything["segment_ids"]) / everything["segment_ids"].size >= 0.98


def test_validation_pass_keeps_every_token_once(stdlib_data_dir):
    seq_len, batch = 64, 8
    batches = list(pipeline.make_iterator(
        data_cfg(stdlib_data_dir, seq_len=seq_len, global_batch_size=batch), split="validation"))
    source = load(stdlib_data_dir, "validation")
    texts = [source[i]["text"] for i in range(len(source))]
    # One stream of exactly the stored documents, in order, none lost or repeated, dealt 8
    # rows per batch (batch k holds rows 8k .. 8k + 7): only the last batch pads rows.
    flat = [{k: b[k][r:r + 1] for k in KEYS} for b in batches for r in range(batch)]
    assert documents(flat, row=0) == [t for t in texts if t]
    rows = -(-sum(len(t) + 2 for t in texts if t) // (seq_len + 1))
    assert len(batches) == -(-rows // batch)
    assert_batches_equal(stack(flat), reference_rows(texts, seq_len, len(flat)))


def test_determinism(stdlib_data_dir):
    def first(seed):
        return take(pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=64,
                                                    global_batch_size=4, shuffle_seed=seed)), 3)
    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    assert not np.array_equal(stack(a)["inputs"], stack(c)["inputs"])


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
@pytest.mark.parametrize("skip", [0, 1, 7, 300])
def test_state_restore_matches_uninterrupted(stdlib_data_dir, skip, packing):
    cfg = data_cfg(stdlib_data_dir, seq_len=128, global_batch_size=4, prefetch=3, packing=packing)
    it = pipeline.make_iterator(cfg)
    for _ in range(skip):
        next(it)
    state = it.get_state()
    uninterrupted = take(it, 5)  # the prefetch thread has read ahead of `state`
    restored_it = pipeline.make_iterator(cfg)
    restored_it.set_state(json.loads(json.dumps(state)))
    for expected, actual in zip(uninterrupted, take(restored_it, 5)):
        assert_batches_equal(actual, expected)


def test_state_restore_after_iterating(stdlib_data_dir):
    # set_state on an iterator that has already run ahead (threads running) rewinds it.
    cfg = data_cfg(stdlib_data_dir, seq_len=512, global_batch_size=2)
    it = pipeline.make_iterator(cfg)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    it.set_state(state)
    for e in expected:
        assert_batches_equal(next(it), e)
    it.close()


def test_state_from_other_settings_is_rejected(stdlib_data_dir):
    state = pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=64)).get_state()
    with pytest.raises(ValueError, match="seq_len"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=32)).set_state(state)
    with pytest.raises(ValueError, match="global_batch"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=8)).set_state(state)
    stale = dict(state, version=1)  # saved by an older data-order function
    with pytest.raises(ValueError, match="version 1"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=64)).set_state(stale)
    # A process's own state holds only its rows: it cannot position another process.
    own = pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=64), process_index=0,
                                 process_count=2).get_state()
    with pytest.raises(ValueError, match=r"reads rows \[8, 9"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=64), process_index=1,
                               process_count=2).set_state(own)


def _rows_of(batches, rows):
    return [{k: b[k][rows] for k in KEYS} for b in batches]


def test_processes_feed_their_rows_of_the_one_global_batch(stdlib_data_dir):
    # The global batch does not depend on the process count: process p of P yields rows
    # [p*B/P, (p+1)*B/P) of the single-process batch, for train and for validation.
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=8)
    for split, n in (("train", 6), ("validation", None)):
        whole = take(pipeline.make_iterator(cfg, split=split), n)
        for count in (2, 4):
            share = 8 // count
            for index in range(count):
                part = take(pipeline.make_iterator(cfg, split=split, process_index=index,
                                                   process_count=count), n)
                want = _rows_of(whole, slice(index * share, (index + 1) * share))
                assert len(part) == len(want)  # validation too: as many batches each
                for got, expected in zip(part, want):
                    assert_batches_equal(got, expected)
    # Any row set (a process's rows under an arbitrary sharding), in the order given.
    part = take(pipeline.make_iterator(cfg, rows=[6, 1, 3]), 6)
    whole = take(pipeline.make_iterator(cfg), 6)
    for got, want in zip(part, _rows_of(whole, [6, 1, 3])):
        assert_batches_equal(got, want)



@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_merged_state_resumes_on_any_process_count(stdlib_data_dir, packing):
    cfg = data_cfg(stdlib_data_dir, seq_len=128, global_batch_size=4, packing=packing)
    halves = [pipeline.make_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    for it in halves:
        for _ in range(9):
            next(it)
    merged = json.loads(json.dumps(pipeline.merge_states([it.get_state() for it in halves])))
    assert merged["rows"] == [0, 1, 2, 3]
    uninterrupted = take(pipeline.make_iterator(cfg), 14)[9:]
    # ... onto one process, and onto 4 processes of one row each.
    single = pipeline.make_iterator(cfg)
    single.set_state(merged)
    for got, want in zip(take(single, 5), uninterrupted):
        assert_batches_equal(got, want)
    for p in range(4):
        quarter = pipeline.make_iterator(cfg, process_index=p, process_count=4)
        quarter.set_state(merged)
        for got, want in zip(take(quarter, 5), _rows_of(uninterrupted, slice(p, p + 1))):
            assert_batches_equal(got, want)
    for it in halves:
        it.close()


def test_single_process_state_of_version_2_still_resumes(stdlib_data_dir):
    # Version 2 sharded documents per process before shuffling; with one process that is
    # the same order, so the envelope jaxlm <= version 2 wrote is accepted.
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=4)
    it = pipeline.make_iterator(cfg)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = take(it, 4)
    meta = {k: v for k, v in state["meta"].items() if k != "global_batch"}
    v2 = {"version": 2, "grain": state["grain"],
          "meta": {**meta, "local_batch": 4, "process_index": 0, "process_count": 1}}
    restored = pipeline.make_iterator(cfg)
    restored.set_state(v2)
    for got, want in zip(take(restored, 4), expected):
        assert_batches_equal(got, want)
    with pytest.raises(ValueError, match="version 2"):  # two processes' v2 states: another order
        pipeline.make_iterator(cfg).set_state(dict(v2, meta={**v2["meta"], "process_count": 2}))


def test_invalid_arguments(stdlib_data_dir):
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, global_batch_size=6), process_count=4)
    with pytest.raises(ValueError, match="not distinct rows"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, global_batch_size=4), rows=[1, 4])
    with pytest.raises(ValueError, match="'nope'"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, dataset="nope"))
    with pytest.raises(ValueError, match="'bpe'"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, tokenizer="bpe"))


def test_weighted_mixture_of_sources(stdlib_data_dir, tmp_path):
    # A second source whose documents are easy to recognise: lines of 'm' bytes.
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text("m" * (50 + i))
    cfg = data_cfg(stdlib_data_dir, seq_len=1024, global_batch_size=8, dataset="stdlib:3,marks:1")
    cfg.sources.marks = ml_collections.ConfigDict({"kind": "text", "paths": str(tmp_path / "*.txt")})
    config.validate(_full(cfg), num_devices=1)
    sources.prepare(cfg, "marks")
    batches = take(pipeline.make_iterator(cfg), 600)
    # Classify every document start (BOS) by its first byte.
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in batches])
    starts = np.flatnonzero(rows.reshape(-1)[:-1] == BOS)
    first = rows.reshape(-1)[starts + 1]
    marks = np.count_nonzero(first == ord("m") + 3)
    # Documents are drawn 3:1 (by document, not by token): 0.25 within sampling noise.
    assert len(starts) > 300 and 0.19 < marks / len(starts) < 0.31, (marks, len(starts))
    again = take(pipeline.make_iterator(cfg), 40)
    for a, b in zip(batches, again):
        assert_batches_equal(a, b)  # a mixture is as deterministic as one source


def _full(data):
    cfg = config.defaults()
    cfg.data = data
    return cfg


def test_sentencepiece_tokenizer_through_the_pipeline(stdlib_data_dir, tmp_path):
    from jaxlm.data import tokenizers

    texts = [open(path, encoding="utf-8").read() for _, path in sources.stdlib_files()[:60]]
    model = tokenizers.train_sentencepiece(texts, tmp_path / "sp.model", vocab_size=600)
    cfg = data_cfg(stdlib_data_dir, seq_len=128, global_batch_size=2, tokenizer="sentencepiece",
                   tokenizer_path=str(model))
    tok = tokenizers.load_tokenizer(cfg)
    (batch,) = take(pipeline.make_iterator(cfg, split="validation"), 1)
    row = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
    assert row[0] == tok.bos_id and row.max() < tok.vocab_size
    first_doc = load(stdlib_data_dir, "validation")[0]["text"].decode()
    text = tok.decode(row[1:])
    assert first_doc.startswith(text[:200]) and len(text) > 200  # ids decode to the document
