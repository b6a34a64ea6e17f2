import collections
import itertools
import json

import grain
import numpy as np
import pytest

from jaxlm import config
from jaxlm.data import pipeline, sources
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


def documents(batches):
    """The documents (bytes) of a packed stream, recovered from BOS ... EOS."""
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
                           for b in batches])
    stream = rows[rows != 0]  # padding is the only id 0
    starts, ends = np.flatnonzero(stream == BOS), np.flatnonzero(stream == EOS)
    return [bytes((stream[s + 1:e] - 3).astype(np.uint8)) for s, e in zip(starts, ends)]


def shuffled_texts(data_dir, seed, n, process_index=0, process_count=1):
    """The first `n` documents of the training stream, in order, read straight from grain."""
    source = sources.load("stdlib", data_dir, "train")
    ds = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed=seed)
    return [ds[i]["text"] for i in range(n)]  # index >= len(ds): the next epoch's shuffle


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
    actual = stack(take(it, steps))
    texts = shuffled_texts(stdlib_data_dir, seed=3, n=60)
    assert sum(len(t) + 2 for t in texts) > steps * batch * (seq_len + 1)  # enough docs
    expected = reference_rows(texts, seq_len, steps * batch)
    assert_batches_equal(actual, expected)
    assert actual["segment_ids"].max() >= 2  # some row holds more than one document
    assert (actual["weights"] == 0).any() and not (actual["segment_ids"] == 0).any()


def test_packing_edge_cases_against_reference():
    # Empty documents, an exact fit, and one document spanning three rows.
    texts = [b"", b"abc", b"", b"x" * 20, b"defgh", b"", b"0123456", b"z"]
    seq_len = 8
    ds = grain.MapDataset.source([{"text": t} for t in texts])
    ds = ds.map(pipeline._Tokenize(ByteTokenizer())).to_iter_dataset()
    rows = list(pipeline._PackIterDataset(ds, seq_len + 1))
    n_tokens = sum(len(t) + 2 for t in texts if t)
    assert len(rows) == -(-n_tokens // (seq_len + 1))
    assert_batches_equal({k: np.stack([r[k] for r in rows]) for k in KEYS},
                         reference_rows(texts, seq_len, len(rows)))


def test_train_epochs_are_reshuffled_permutations(stdlib_data_dir):
    source = sources.load("stdlib", stdlib_data_dir, "train")
    n = len(source)
    ds = grain.MapDataset.source(source).shuffle(seed=0)
    paths = [ds[i]["path"] for i in range(2 * n)]
    first, second = paths[:n], paths[n:]
    assert sorted(first) == sorted(second) == sorted(source[i]["path"] for i in range(n))
    assert first != second
    assert first != [source[i]["path"] for i in range(n)]


def test_train_stream_is_each_epoch_in_shuffled_order(stdlib_data_dir):
    # One whole epoch and the start of the next: every document exactly once per epoch, in
    # the per-epoch shuffled order, across the epoch boundary (nothing lost or duplicated).
    seq_len, batch = 2048, 64
    source = sources.load("stdlib", stdlib_data_dir, "train")
    n = len(source)
    texts = shuffled_texts(stdlib_data_dir, seed=5, n=n + 40)
    epoch_tokens = sum(len(t) + 2 for t in texts[:n] if t)
    steps = -(-(epoch_tokens // (seq_len + 1) + 20) // batch)
    got = documents(take(pipeline.make_iterator(
        data_cfg(stdlib_data_dir, seq_len=seq_len, global_batch_size=batch, shuffle_seed=5)),
        steps))
    expected = [t for t in texts if t]
    per_epoch = sum(1 for t in texts[:n] if t)  # empty files are skipped
    assert len(got) > per_epoch  # crossed into the second epoch
    assert got == expected[:len(got)]
    assert collections.Counter(got[:per_epoch]) == collections.Counter(
        source[i]["text"] for i in range(n) if source[i]["text"])
    assert got[per_epoch:] != got[:len(got) - per_epoch]  # the second epoch is reshuffled


def test_validation_pass_keeps_every_token_once(stdlib_data_dir):
    seq_len, batch = 64, 8
    batches = list(pipeline.make_iterator(
        data_cfg(stdlib_data_dir, seq_len=seq_len, global_batch_size=batch), split="validation"))
    source = sources.load("stdlib", stdlib_data_dir, "validation")
    texts = [source[i]["text"] for i in range(len(source))]
    # Exactly the stored documents, in stored order, none lost or repeated.
    assert documents(batches) == [t for t in texts if t]
    n_tokens = sum(len(t) + 2 for t in texts if t)
    rows = -(-n_tokens // (seq_len + 1))
    assert len(batches) == -(-rows // batch)
    assert_batches_equal(stack(batches), reference_rows(texts, seq_len, len(batches) * batch))


def test_determinism(stdlib_data_dir):
    def first(seed):
        return take(pipeline.make_iterator(data_cfg(stdlib_data_dir, seq_len=64,
                                                    global_batch_size=4, shuffle_seed=seed)), 3)
    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert_batches_equal(x, y)
    assert not np.array_equal(stack(a)["inputs"], stack(c)["inputs"])


@pytest.mark.parametrize("skip", [0, 1, 7])
def test_state_restore_matches_uninterrupted(stdlib_data_dir, skip):
    cfg = data_cfg(stdlib_data_dir, seq_len=128, global_batch_size=4, prefetch=3)
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


def test_two_processes_read_disjoint_covering_shards(stdlib_data_dir):
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=8)
    source = sources.load("stdlib", stdlib_data_dir, "validation")
    everything = collections.Counter(source[i]["text"] for i in range(len(source)))
    shards = []
    for index in range(2):
        batches = list(pipeline.make_iterator(cfg, split="validation", process_index=index,
                                              process_count=2))
        assert batches[0]["inputs"].shape == (4, 64)
        shards.append(collections.Counter(documents(batches)))
    assert shards[0] and shards[1]
    assert shards[0] + shards[1] == everything  # disjoint and covering
    # Train: each process's shuffled stream only holds its own shard's documents.
    for index in range(2):
        got = documents(take(pipeline.make_iterator(
            data_cfg(stdlib_data_dir, seq_len=2048, global_batch_size=8),
            process_index=index, process_count=2), 4))
        own = set(shuffled_texts(stdlib_data_dir, 0, 400, index, 2))
        other = set(shuffled_texts(stdlib_data_dir, 0, 400, 1 - index, 2))
        # (A few short texts occur twice in the stdlib: only texts unique to `other` count.)
        assert got and set(got) <= own and not set(got) & (other - own)


def test_invalid_arguments(stdlib_data_dir):
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, global_batch_size=6), process_count=4)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, dataset="nope"))
    with pytest.raises(ValueError, match="'bpe'"):
        pipeline.make_iterator(data_cfg(stdlib_data_dir, tokenizer="bpe"))


def test_corpus_splits_and_idempotent_prepare(stdlib_data_dir, monkeypatch):
    train = sources.load("stdlib", stdlib_data_dir, "train")
    validation = sources.load("stdlib", stdlib_data_dir, "validation")
    paths = [train[i]["path"].decode() for i in range(len(train))]
    val_paths = [validation[i]["path"].decode() for i in range(len(validation))]
    assert sorted(paths + val_paths) == [p for p, _ in sources.stdlib_files()]
    assert 0 < len(val_paths) < 0.03 * len(paths)
    assert not any(set(p.split("/")[:-1]) & {"test", "tests", "site-packages"} for p in paths)
    # A second prepare must not rebuild (the CLI calls it on every start).
    monkeypatch.setattr(sources.Stdlib, "_generate_examples",
                        lambda *a: pytest.fail("rebuilt an existing dataset"))
    sources.prepare("stdlib", stdlib_data_dir)
    with pytest.raises(ValueError, match="'nope'"):
        sources.prepare("nope", stdlib_data_dir)
