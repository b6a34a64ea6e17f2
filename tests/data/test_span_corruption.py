"""T5 span corruption's data: seqio's lengths and noise masks, sentinel examples, the
encoder/decoder packing (jaxlm.data.objectives, seq2seq_packing, pipeline objective
"span_corruption"), and T5's tokenizer facts against transformers' tokenizer built locally."""

import io
import itertools
import json
import pathlib
import pickle

import grain
import ml_collections
import numpy as np
import pytest

from jaxlm import config
from jaxlm.data import objectives, pipeline, sources
from jaxlm.data import tokenizers as T
from jaxlm.errors import ConfigError

ENCODER = ("inputs", "input_segment_ids", "input_positions")
DECODER = ("decoder_inputs", "targets", "segment_ids", "positions", "weights")
MODEL_VOCAB = 384  # byte tokenizer: sentinels 383, 382, ...
EOS = 2  # the byte tokenizer's


def data_cfg(data_dir, **overrides):
    cfg = config.defaults().data
    cfg.data_dir = data_dir
    cfg.update(overrides)
    return cfg


def span(**overrides):
    cfg = config.defaults().objective
    cfg.name = "span_corruption"
    cfg.update(overrides)
    return cfg


def take(it, n=None):
    batches = list(itertools.islice(it, n))
    it.close()
    return batches


def iterator(cfg, **kwargs):
    kwargs.setdefault("model_vocab_size", MODEL_VOCAB)
    return pipeline.make_iterator(cfg, objective_cfg=kwargs.pop("objective", span()), **kwargs)


def assert_batches_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(actual[k], expected[k], err_msg=k)


def reassemble(inputs, targets, sentinels):
    """The chunk an example was made of: each sentinel of the inputs replaced by the
    target tokens after the same sentinel (the closing EOS dropped from both)."""
    sentinels = {int(s) for s in sentinels}
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1].tolist():
        out += spans[t] if t in sentinels else [t]
    return out


# ---- lengths ---------------------------------------------------------------------------------

def seqio_lengths(inputs_length, density, mean_span):
    """seqio's random_spans_helper, step by step (the reference)."""
    def lengths(n):
        noise = round(n * density)
        spans = round(noise / mean_span)
        return n - noise + spans + 1, noise + spans + 1
    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    inputs, targets = lengths(n)
    if density == 0.5 and targets > inputs:
        n, targets = n - 1, targets - 1
    return n, targets


def test_lengths_are_seqio_random_spans_helper():
    assert objectives.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)  # T5's C4 task
    for seq_len in (16, 33, 64, 100, 257, 512, 1000, 2048, 4097):
        for density in (0.05, 0.15, 0.3, 0.5, 0.8):
            for mean_span in (1.0, 2.5, 3.0, 8.0):
                assert objectives.span_corruption_lengths(seq_len, density, mean_span) == \
                    seqio_lengths(seq_len, density, mean_span), (seq_len, density, mean_span)


# ---- noise masks and examples ----------------------------------------------------------------

def expected_counts(length, density, mean_span):
    """seqio's counts in TensorFlow's float32, with its bounds."""
    padded = max(length, 2)
    noise = int(np.round(np.float32(padded) * np.float32(density)))
    noise = min(max(noise, 1), padded - 1)
    spans = max(int(np.round(np.float32(noise) / np.float32(mean_span))), 1)
    return noise, spans


def runs(mask):
    """[(value, length)] of the runs of a bool array."""
    return [(bool(k), len(list(g))) for k, g in itertools.groupby(mask.tolist())]


def test_noise_masks_have_seqio_counts_and_alternate():
    rng = np.random.default_rng(0)
    for length in list(range(2, 80)) + rng.integers(80, 3000, size=40).tolist():
        for density, mean_span in ((0.15, 3.0), (0.5, 2.0), (0.3, 8.0), (0.15, 1.0)):
            mask = objectives.random_spans_noise_mask(length, density, mean_span, rng)
            noise, spans = expected_counts(length, density, mean_span)
            assert mask.shape == (length,) and mask.sum() == noise
            pattern = runs(mask)
            # Non-noise first, then alternating, ending with noise: `spans` of each.
            assert [v for v, _ in pattern] == [False, True] * spans
    assert objectives.random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]


def test_every_mask_is_equally_likely():
    # 20 tokens at density 0.3: 6 noise tokens in 2 spans (5 ways) and 14 non-noise tokens
    # in 2 spans (13 ways): 65 masks, each drawn ~1/65 of the time.
    rng = np.random.default_rng(1)
    counts = {}
    for _ in range(6500):
        mask = objectives.random_spans_noise_mask(20, 0.3, 3.0, rng)
        counts[mask.tobytes()] = counts.get(mask.tobytes(), 0) + 1
    assert len(counts) == 65
    assert 60 < min(counts.values()) and max(counts.values()) < 145  # ~100 +- 10 each


def byte_spec(seq_len=64, **overrides):
    return objectives.span_corruption(span(**overrides), seq_len, T.ByteTokenizer(),
                                      MODEL_VOCAB)


def test_examples_reassemble_to_their_chunk():
    rng = np.random.default_rng(2)
    for seq_len in (32, 64, 200):
        spec = byte_spec(seq_len)
        assert spec.tokens_length == seqio_lengths(seq_len, 0.15, 3.0)[0]
        assert spec.targets_len == seqio_lengths(seq_len, 0.15, 3.0)[1]
        for _ in range(300):
            length = int(rng.integers(1, spec.tokens_length + 1))
            chunk = rng.integers(3, 259, size=length).astype(np.int32)
            inputs, targets = spec.example(chunk, rng)
            assert inputs.dtype == targets.dtype == np.int32
            assert reassemble(inputs, targets, spec.sentinels) == chunk.tolist()
            assert inputs[-1] == targets[-1] == EOS
            assert len(inputs) <= seq_len and len(targets) <= spec.targets_len
            noise, spans = expected_counts(length, 0.15, 3.0)
            if length > 1:
                # Sentinels in order 383, 382, ...: one per noise span in the inputs, one
                # per non-noise span in the targets, which start with the first.
                used = spec.sentinels[:spans].tolist()
                assert [t for t in inputs.tolist() if t >= 300] == used
                assert [t for t in targets.tolist() if t >= 300] == used
                assert targets[0] == MODEL_VOCAB - 1
                assert len(targets) - spans - 1 == noise  # the noise tokens
    # A full chunk fills the encoder row exactly (seqio's lengths).
    spec = byte_spec(64)
    inputs, targets = spec.example(np.arange(3, 3 + spec.tokens_length, dtype=np.int32), rng)
    assert (len(inputs), len(targets)) == (64, spec.targets_len)


def test_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"objective\.targets_len.*14"):
        byte_spec(64, targets_len=13)
    assert byte_spec(64, targets_len=20).targets_len == 20
    with pytest.raises(ConfigError, match=r"data\.seq_len: 8 is too short"):
        byte_spec(8)  # one noise token makes one span: seqio's formula counts none
    with pytest.raises(ConfigError, match=r"model\.vocab_size.*>= 262"):
        objectives.span_corruption(span(), 64, T.ByteTokenizer(), 261)  # 3 sentinels needed
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        objectives.span_corruption(span(), 64, T.ByteTokenizer(), None)
    with pytest.raises(ConfigError, match="noise spans than non-noise tokens"):
        byte_spec(64, noise_density=0.8, mean_span_length=1.0)


# ---- the pipeline ----------------------------------------------------------------------------

def examples_of(pair):
    """The (inputs, targets) of each segment of one row pair, checking the layout."""
    found = []
    in_seg, out_seg = pair["input_segment_ids"], pair["segment_ids"]
    assert (pair["inputs"][in_seg == 0] == 0).all() and (pair["targets"][out_seg == 0] == 0).all()
    assert (pair["decoder_inputs"][out_seg == 0] == 0).all()
    np.testing.assert_array_equal(pair["weights"], (out_seg != 0).astype(np.float32))
    segments = sorted(set(in_seg.tolist()) - {0})
    assert segments == list(range(1, len(segments) + 1)) == sorted(set(out_seg.tolist()) - {0})
    for s in segments:
        enc, dec = np.flatnonzero(in_seg == s), np.flatnonzero(out_seg == s)
        for idx, positions in ((enc, pair["input_positions"]), (dec, pair["positions"])):
            assert (np.diff(idx) == 1).all() and positions[idx].tolist() == list(range(len(idx)))
        targets = pair["targets"][dec]
        assert pair["decoder_inputs"][dec].tolist() == [0, *targets[:-1].tolist()]
        found.append((pair["inputs"][enc], targets))
    # Segments fill the rows from the start, in order.
    assert (np.flatnonzero(in_seg) == np.arange(np.count_nonzero(in_seg))).all()
    return found


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory):
    """A local text source "short" of 400 paragraphs of 1 to 99 bytes (blank-line separated
    documents), prepared."""
    root = tmp_path_factory.mktemp("short")
    rng = np.random.default_rng(5)
    words = [w for text in SENTENCES for w in text.split()]
    paragraphs = []
    while len(paragraphs) < 400:
        n = int(rng.integers(1, 100))
        text = " ".join(rng.choice(words, size=n)).strip()[:n]
        if text:
            paragraphs.append(text)
    (root / "docs.txt").write_text("\n\n".join(paragraphs))
    cfg = data_cfg(str(root / "tfds"), dataset="short")
    cfg.sources.short = ml_collections.ConfigDict(
        {"kind": "text", "paths": str(root / "docs.txt"), "split_by": "blank_line"})
    sources.prepare(cfg, "short")
    return cfg


@pytest.mark.parametrize("corpus", ["stdlib", "short"])
def test_rows_pack_the_chunks_of_the_stream_in_order(stdlib_data_dir, short_corpus, corpus):
    # stdlib: long documents, cut into many chunks; short: several examples per pair.
    seq_len, batch, steps = 64, 4, 40
    cfg = data_cfg(stdlib_data_dir) if corpus == "stdlib" else \
        short_corpus.copy_and_resolve_references()
    cfg.update({"seq_len": seq_len, "global_batch_size": batch, "shuffle_seed": 4})
    spec = byte_spec(seq_len)
    batches = take(iterator(cfg), steps)
    for b in batches:
        for k in ENCODER:
            assert b[k].shape == (batch, seq_len) and b[k].dtype == np.int32, k
        for k in DECODER:
            assert b[k].shape == (batch, spec.targets_len), k
            assert b[k].dtype == (np.float32 if k == "weights" else np.int32), k
    shuffled = grain.MapDataset.source(sources.load(cfg, corpus, "train")).shuffle(seed=4)
    noise = total = 0
    for j in range(batch):
        chunks = [reassemble(i, t, spec.sentinels)
                  for b in batches for i, t in examples_of({k: v[j] for k, v in b.items()})]
        # The reference: documents j, j + 4, ... (text ids, no BOS/EOS) cut into chunks.
        expected = []
        for i in itertools.count():
            ids = [c + 3 for c in shuffled[j + batch * i]["text"]]
            expected += [ids[k:k + spec.tokens_length]
                         for k in range(0, len(ids), spec.tokens_length)]
            if len(expected) > len(chunks):
                break
        assert chunks == expected[:len(chunks)], j
        assert len(chunks) >= steps
        noise += sum(int(np.count_nonzero(b["weights"][j])) for b in batches)
        total += sum(len(c) for c in chunks)
    if corpus == "short":  # short examples share pairs
        per_row = np.array([b["input_segment_ids"].max(axis=1) for b in batches])
        assert per_row.max() >= 3 and per_row.mean() > 1.2
    else:  # long ones: targets = noise + a sentinel per span + EOS, ~0.15 + 0.05 + 1/70
        assert 0.19 < noise / total < 0.23


def test_deterministic_and_resumes_exactly(stdlib_data_dir):
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=4, prefetch=3)
    whole = take(iterator(cfg), 14)
    for got, want in zip(take(iterator(cfg), 14), whole):
        assert_batches_equal(got, want)
    for skip in (0, 1, 9):
        it = iterator(cfg)
        for _ in range(skip):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        it.close()
        resumed = iterator(cfg)
        resumed.set_state(state)
        for got, want in zip(take(resumed, 5), whole[skip:]):
            assert_batches_equal(got, want)
    # Processes: each its rows of the one global batch; their merged state resumes anywhere.
    halves = [iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    for p, it in enumerate(halves):
        for step in range(6):
            assert_batches_equal(next(it), {k: v[2 * p:2 * p + 2] for k, v in whole[step].items()})
    merged = json.loads(json.dumps(pipeline.merge_states([it.get_state() for it in halves])))
    for it in halves:
        it.close()
    single = iterator(cfg)
    single.set_state(merged)
    for got, want in zip(take(single, 4), whole[6:]):
        assert_batches_equal(got, want)


def test_a_state_of_another_objective_or_setting_is_refused(stdlib_data_dir):
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=2)
    it = iterator(cfg)
    state = it.get_state()
    it.close()
    assert state["meta"]["objective"] == {
        "name": "span_corruption", "noise_density": 0.15, "mean_span_length": 3.0,
        "targets_len": 14, "eos_id": EOS, "decoder_start_id": 0, "sentinels": [383, 382, 381]}
    with pytest.raises(ValueError, match="objective"):
        pipeline.make_iterator(cfg).set_state(state)
    with pytest.raises(ValueError, match="noise_density"):
        iterator(cfg, objective=span(noise_density=0.2)).set_state(state)
    with pytest.raises(ConfigError, match=r"data\.packing"):
        iterator(data_cfg(stdlib_data_dir, seq_len=64, packing="first_fit"))


def test_validation_pass_ends_and_pads(stdlib_data_dir):
    cfg = data_cfg(stdlib_data_dir, seq_len=256, global_batch_size=8)
    batches = take(iterator(cfg, split="validation"))
    source = sources.load(cfg, "stdlib", "validation")
    spec = byte_spec(256)
    chunks = sum(-(-len(source[i]["text"]) // spec.tokens_length) for i in range(len(source)))
    found = sum(len(examples_of({k: v[j] for k, v in b.items()}))
                for b in batches for j in range(8))
    assert found == chunks  # every chunk of every document once
    assert (batches[-1]["segment_ids"] == 0).any()  # streams that ended are padding


# ---- T5's tokenizer --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny T5 SentencePiece model (pad 0, eos 1, unk 2, no BOS) as a Hugging Face T5
    directory: spiece.model and tokenizer_config.json."""
    import sentencepiece as spm
    texts = [pathlib.Path(p).read_text(encoding="utf-8")[:3000]
             for _, p in sources.stdlib_files()[:40]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                   vocab_size=300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", minloglevel=2, num_threads=1)
    directory = tmp_path_factory.mktemp("t5")
    (directory / "spiece.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    return directory


SENTENCES = ["Hello world, this is a test.", "def f(x): return x + 1",
             "The quick brown fox jumps over the lazy dog!", "import os\nimport sys"]


def test_t5_sentencepiece_matches_transformers(t5_dir, tmp_path):
    from transformers import T5Tokenizer
    hf = T5Tokenizer.from_pretrained(str(t5_dir))
    tok = T.load_tokenizer(data_cfg("", tokenizer="sentencepiece", tokenizer_path=str(t5_dir)))
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id, tok.adds_bos) == \
        (len(hf), hf.pad_token_id, hf.eos_token_id, None, False) == (400, 0, 1, None, False)
    assert tok.decoder_start_id == 0 and tok.mask_id is None
    names = [f"<extra_id_{k}>" for k in range(100)]
    assert tok.sentinel_ids(100) == hf.convert_tokens_to_ids(names) == list(range(399, 299, -1))
    for text in SENTENCES:
        assert tok.document(tok.encode(text)).tolist() == hf(text)["input_ids"]
    assert tok.decode([5, *tok.sentinel_ids(2)]).endswith("<extra_id_0><extra_id_1>")
    assert set(tok.special_ids()) >= {0, 1, 2, *tok.sentinels}
    with pytest.raises(ValueError, match="100 sentinel"):
        tok.sentinel_ids(101)
    # Kept by the run's tokenizer/ directory and by pickling.
    tok.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / T.SAVED_CONFIG).read_text())["extra_ids"] == 100
    for again in (T.load_saved(tmp_path / "saved"), pickle.loads(pickle.dumps(tok))):
        assert (again.vocab_size, again.sentinels) == (tok.vocab_size, tok.sentinels)
        assert again.encode(SENTENCES[2]).tolist() == tok.encode(SENTENCES[2]).tolist()
    # T5's tokenizer.json (the fast tokenizer's file) gives the same ids.
    hf.save_pretrained(str(tmp_path / "fast"))
    fast = T.HFTokenizer.from_file(tmp_path / "fast" / "tokenizer.json")
    assert (fast.vocab_size, fast.pad_id, fast.eos_id, fast.bos_id, fast.sentinels) == \
        (tok.vocab_size, 0, 1, None, tok.sentinels)
    for text in SENTENCES:
        assert fast.document(fast.encode(text)).tolist() == hf(text)["input_ids"]


def test_extra_ids_come_from_the_hugging_face_files(t5_dir, tmp_path):
    model = (t5_dir / "spiece.model").read_bytes()
    (tmp_path / "spiece.model").write_bytes(model)
    assert T.hf_extra_ids(tmp_path) == 0  # nothing says T5: the plain SentencePiece model
    assert T.SentencePieceTokenizer.from_file(tmp_path / "spiece.model").sentinels == ()
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    assert T.hf_extra_ids(tmp_path) == 100  # transformers' default for T5
    (tmp_path / "tokenizer_config.json").write_text('{"extra_ids": 7}')
    seven = T.SentencePieceTokenizer.from_file(tmp_path / "spiece.model")
    assert seven.sentinel_ids(7) == list(range(306, 299, -1))
    # 256-token inputs make up to 14 spans: 7 sentinels cannot serve them.
    assert objectives.check_span_corruption(span(), 256)[2] == 14
    with pytest.raises(ConfigError, match=r"data\.seq_len.*14 noise spans.*7 sentinels"):
        objectives.span_corruption(span(), 256, seven, None)
    assert objectives.span_corruption(span(), 128, seven, None).sentinels.tolist() == \
        list(range(306, 299, -1))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        T.SentencePieceTokenizer.from_file(tmp_path / "spiece.model")


def test_t5_tokenizer_through_the_pipeline(stdlib_data_dir, t5_dir):
    cfg = data_cfg(stdlib_data_dir, seq_len=128, global_batch_size=2, tokenizer="sentencepiece",
                   tokenizer_path=str(t5_dir))
    tok = T.load_tokenizer(cfg)
    it = iterator(cfg, model_vocab_size=None, split="validation")
    meta = it.get_state()["meta"]["objective"]
    batches = take(it, 4)
    spans = objectives.realized_lengths(
        objectives.span_corruption_lengths(128, 0.15, 3.0)[0], 0.15, 3.0)[2]
    assert meta["sentinels"] == tok.sentinel_ids(spans) and meta["eos_id"] == 1
    document = sources.load(cfg, "stdlib", "validation")[0]["text"].decode()
    ids = tok.encode(document).tolist()
    first = examples_of({k: v[0] for k, v in batches[0].items()})[0]
    spec_tokens = objectives.span_corruption_lengths(128, 0.15, 3.0)[0]
    assert first[0][-1] == first[1][-1] == tok.eos_id
    assert reassemble(*first, tok.sentinels) == ids[:spec_tokens]
