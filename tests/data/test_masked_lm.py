"""Masked LM's data: BERT's 80/10/10 masking of packed rows (jaxlm.data.objectives,
pipeline objective "masked_lm"), and the BERT/RoBERTa tokenizer facts it needs, against
transformers' tokenizers built locally."""

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

KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
BYTE_SPECIAL = (0, 1, 2)  # pad, BOS, EOS
MODEL_VOCAB = 384  # the byte tokenizer's 259 ids padded: the mask is 383
TEXTS = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog!",
         "def f(x): return x + 1", "naïve café, déjà vu",
         "Masked language models read both ways."]


def data_cfg(data_dir, **overrides):
    cfg = config.defaults().data
    cfg.data_dir = data_dir
    cfg.update(overrides)
    return cfg


def mlm(**overrides):
    cfg = config.defaults().objective
    cfg.name = "masked_lm"
    cfg.update(overrides)
    return cfg


def take(it, n):
    batches = list(itertools.islice(it, n))
    it.close()
    return batches


def iterator(cfg, **kwargs):
    kwargs.setdefault("model_vocab_size", MODEL_VOCAB)
    return pipeline.make_iterator(cfg, objective_cfg=kwargs.pop("objective", mlm()), **kwargs)


def assert_batches_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(actual[k], expected[k], err_msg=k)


# ---- tokenizers ------------------------------------------------------------------------------

def bert_tokenizer_json(path):
    """A tiny BERT WordPiece tokenizer.json, as bert-base-uncased's is built."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    code = [pathlib.Path(p).read_text(encoding="utf-8") for _, p in sources.stdlib_files()[:20]]
    tok.train_from_iterator(TEXTS * 20 + code, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def roberta_tokenizer_json(path):
    """A tiny RoBERTa byte-level BPE: <s> <pad> </s> <unk> 0..3, <mask> the last id."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0),
                                                      add_prefix_space=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return bert_tokenizer_json(tmp_path_factory.mktemp("bert") / "tokenizer.json")


def test_bert_tokenizer_matches_transformers(bert_path, tmp_path):
    from transformers import BertTokenizerFast
    hf = BertTokenizerFast(tokenizer_file=str(bert_path))
    tok = T.load_tokenizer(data_cfg("", tokenizer="hf", tokenizer_path=str(bert_path)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (
        hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 2, 3, 4)
    assert tok.adds_bos and tok.sentinels == ()
    for text in TEXTS:  # a document is what BERT's tokenizer makes of a sentence
        assert tok.document(tok.encode(text)).tolist() == hf(text)["input_ids"]
    assert set(hf.all_special_ids) <= set(tok.special_ids())
    # The run's tokenizer/ directory and pickling keep the mask.
    tok.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / T.SAVED_CONFIG).read_text())["mask_id"] == 4
    for again in (T.load_saved(tmp_path / "saved"), pickle.loads(pickle.dumps(tok))):
        assert (again.mask_id, again.bos_id, again.eos_id, again.special_ids()) == \
            (4, 2, 3, tok.special_ids())


def test_roberta_tokenizer_matches_transformers(tmp_path):
    from transformers import RobertaTokenizerFast
    path = roberta_tokenizer_json(tmp_path / "roberta" / "tokenizer.json")
    hf = RobertaTokenizerFast(tokenizer_file=str(path), add_prefix_space=False)
    tok = T.HFTokenizer.from_file(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (
        hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id)
    assert tok.mask_id == tok.vocab_size - 1 and tok.adds_bos
    for text in TEXTS:
        assert tok.document(tok.encode(text)).tolist() == hf(text)["input_ids"]
    # A spelled mask in a document is text, not the mask id.
    assert tok.mask_id not in tok.encode("a <mask> b").tolist()


def test_tokenizers_without_a_mask_token():
    assert T.ByteTokenizer().mask_id is None
    assert T.ByteTokenizer().special_ids() == list(BYTE_SPECIAL)


def test_sentencepiece_mask_is_a_control_piece(tmp_path):
    import sentencepiece as spm
    code = [pathlib.Path(p).read_text(encoding="utf-8")[:3000]
            for _, p in sources.stdlib_files()[:30]]
    for controls, expected in (([], None), (["[MASK]"], "[MASK]")):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(code), model_writer=model,
                                       vocab_size=300, control_symbols=controls,
                                       minloglevel=2, num_threads=1)
        tok = T.SentencePieceTokenizer(model.getvalue())
        raw = spm.SentencePieceProcessor(model_proto=model.getvalue())
        if expected is None:
            assert tok.mask_id is None
        else:
            assert tok.mask_id == raw.piece_to_id("[MASK]") and tok.mask_id in tok.special_ids()
            assert tok.mask_id not in tok.encode("a [MASK] b").tolist()  # text stays text
        assert {raw.unk_id(), raw.bos_id(), raw.eos_id()} <= set(tok.special_ids())


def test_a_saved_mask_id_is_kept_and_checked(bert_path, tmp_path):
    tok = T.HFTokenizer.from_file(bert_path)
    tok.save(tmp_path)
    config_path = tmp_path / T.SAVED_CONFIG
    saved = json.loads(config_path.read_text())
    saved["mask_id"] = 7  # what the run used wins over the file's rules
    config_path.write_text(json.dumps(saved))
    assert T.load_saved(tmp_path).mask_id == 7
    saved["mask_id"] = tok.vocab_size
    config_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="mask_id"):
        T.load_saved(tmp_path)


# ---- masking a row ---------------------------------------------------------------------------

def test_mask_tokens_statistics_against_bert():
    # Rows of 200 tokens, a quarter of them padding or special: of the n candidates exactly
    # max(1, round(0.15 n)) are selected; 80% become the mask, 10% a random non-special
    # id, 10% stay.
    rng = np.random.default_rng(0)
    random_ids = np.arange(3, 259, dtype=np.int32)
    selected_total, masked, randomized, kept = 0, 0, 0, 0
    for _ in range(400):
        tokens = rng.integers(3, 259, size=200).astype(np.int32)
        tokens[rng.random(200) < 0.1] = 1
        tokens[150 + rng.integers(50):] = 0
        candidates = tokens > 2
        inputs, selected = objectives.mask_tokens(tokens, candidates, rng, 0.15, 383, random_ids)
        n = int(candidates.sum())
        assert selected.sum() == max(1, round(0.15 * n))
        assert not selected[~candidates].any()  # padding and specials never selected
        np.testing.assert_array_equal(inputs[~selected], tokens[~selected])
        changed = inputs[selected]
        assert set(changed[changed != 383].tolist()) <= set(random_ids.tolist())
        selected_total += int(selected.sum())
        masked += int((changed == 383).sum())
        randomized += int(((changed != 383) & (changed != tokens[selected])).sum())
        kept += int((changed == tokens[selected]).sum())
    # ~11,000 selected: the shares' standard deviations are below 0.004.
    assert abs(masked / selected_total - 0.8) < 0.015
    assert abs(randomized / selected_total - 0.1 * 255 / 256) < 0.012
    assert abs(kept / selected_total - (0.1 + 0.1 / 256)) < 0.012


def test_mask_tokens_edge_cases():
    rng = np.random.default_rng(1)
    tokens = np.array([1, 5, 2, 0, 0], np.int32)
    inputs, selected = objectives.mask_tokens(tokens, tokens > 2, rng, 0.15, 99, np.array([7]))
    assert selected.tolist() == [False, True, False, False, False]  # at least one, as BERT
    inputs, selected = objectives.mask_tokens(tokens, np.zeros(5, bool), rng, 0.15, 99,
                                              np.array([7]))
    assert not selected.any() and inputs.tolist() == tokens.tolist()


# ---- the pipeline ----------------------------------------------------------------------------

def reference_rows(texts, seq_len, n_rows):
    """Plain-Python concatenation of [BOS] bytes+3 [EOS] documents cut into rows of seq_len
    (no shift): tokens, segment ids, positions."""
    stream = []
    for doc, text in enumerate(texts):
        if text:
            stream += [(t, doc) for t in [1, *(b + 3 for b in text), 2]]
    rows = []
    for r in range(n_rows):
        row = stream[r * seq_len:(r + 1) * seq_len]
        row += [(0, None)] * (seq_len - len(row))
        segments, positions, segment, position, previous = [], [], 0, 0, object()
        for _, doc in row:
            if doc is None:
                segment, position = 0, 0
            elif doc != previous:
                segment, position = segment + 1, 0
            segments.append(segment if doc is not None else 0)
            positions.append(position if doc is not None else 0)
            position, previous = position + 1, doc
        rows.append(([t for t, _ in row], segments, positions))
    return rows


def test_rows_are_packed_documents_masked_as_bert(stdlib_data_dir):
    seq_len, batch, steps = 128, 4, 40
    cfg = data_cfg(stdlib_data_dir, seq_len=seq_len, global_batch_size=batch, shuffle_seed=2)
    batches = take(iterator(cfg), steps)
    for b in batches:
        assert sorted(b) == sorted(KEYS)
        for k in KEYS:
            assert b[k].shape == (batch, seq_len)
            assert b[k].dtype == (np.float32 if k == "weights" else np.int32), k
    source = sources.load(cfg, "stdlib", "train")
    shuffled = grain.MapDataset.source(source).shuffle(seed=2)
    selected_total = masked = 0
    for j in range(batch):  # row j of every batch: stream j, documents j, j + 4, ...
        texts = [shuffled[j + batch * i]["text"] for i in range(30)]
        assert sum(len(t) + 2 for t in texts) > steps * seq_len
        for step, (tokens, segments, positions) in enumerate(reference_rows(texts, seq_len,
                                                                            steps)):
            b = {k: v[j] for k, v in batches[step].items()}
            assert b["targets"].tolist() == tokens
            assert b["segment_ids"].tolist() == segments
            assert b["positions"].tolist() == positions
            selected = b["weights"] == 1
            assert set(np.unique(b["weights"]).tolist()) <= {0.0, 1.0}
            candidates = (b["segment_ids"] != 0) & ~np.isin(b["targets"], BYTE_SPECIAL)
            assert selected.sum() == max(1, round(0.15 * candidates.sum()))
            assert not selected[~candidates].any()
            np.testing.assert_array_equal(b["inputs"][~selected], b["targets"][~selected])
            selected_total += int(selected.sum())
            masked += int((b["inputs"][selected] == MODEL_VOCAB - 1).sum())
    assert abs(masked / selected_total - 0.8) < 0.03  # ~3,000 selected


def short_documents(tmp_path, n=60):
    """A local text source of `n` one-sentence documents, prepared."""
    for i in range(n):
        (tmp_path / "docs" / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(f"{TEXTS[i % len(TEXTS)]} {i}")
    cfg = data_cfg(str(tmp_path / "tfds"), dataset="short")
    cfg.sources.short = ml_collections.ConfigDict(
        {"kind": "text", "paths": str(tmp_path / "docs" / "*.txt")})
    sources.prepare(cfg, "short")
    return cfg


def test_bert_documents_through_the_pipeline(tmp_path, bert_path):
    cfg = short_documents(tmp_path)
    cfg.update({"seq_len": 48, "global_batch_size": 2, "tokenizer": "hf",
                "tokenizer_path": str(bert_path)})
    tok = T.load_tokenizer(cfg)
    batches = take(iterator(cfg, model_vocab_size=None), 30)
    targets = np.concatenate([b["targets"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    segments = np.concatenate([b["segment_ids"] for b in batches])
    inputs = np.concatenate([b["inputs"] for b in batches])
    first = targets[0][segments[0] == 1]
    assert first[0] == tok.bos_id == 2  # [CLS] opens a document
    # Documents end with [SEP]: every segment that ends inside a row ends with it.
    ends = (segments[:, :-1] != segments[:, 1:]) & (segments[:, :-1] != 0)
    assert ends.any() and (targets[:, :-1][ends] == tok.eos_id).all()
    selected = weights == 1
    assert not np.isin(targets[selected], tok.special_ids()).any()  # [CLS]/[SEP]/[UNK]/pad
    assert (inputs[selected] == tok.mask_id).mean() > 0.7  # [MASK], the tokenizer's own
    changed = inputs[selected & (inputs != tok.mask_id) & (inputs != targets)]
    assert not np.isin(changed, tok.special_ids()).any() and changed.max() < tok.vocab_size


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_deterministic_and_resumes_exactly(stdlib_data_dir, packing):
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=4, prefetch=3,
                   packing=packing)
    whole = take(iterator(cfg), 12)
    for got, want in zip(take(iterator(cfg), 12), whole):
        assert_batches_equal(got, want)  # the batch at step k is a function of the config
    it = iterator(cfg)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = iterator(cfg)
    resumed.set_state(state)
    for got, want in zip(take(resumed, 5), whole[7:]):
        assert_batches_equal(got, want)
    other_seed = take(iterator(data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=4,
                                        packing=packing, shuffle_seed=1)), 1)[0]
    assert not np.array_equal(other_seed["inputs"], whole[0]["inputs"])


def test_processes_mask_their_rows_as_one_process_would(stdlib_data_dir):
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=4)
    whole = take(iterator(cfg), 6)
    halves = [iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    for p, it in enumerate(halves):
        for got, want in zip(take(iterator(cfg, process_index=p, process_count=2), 6), whole):
            assert_batches_equal(got, {k: v[2 * p:2 * p + 2] for k, v in want.items()})
        for _ in range(3):
            next(it)
    merged = pipeline.merge_states([it.get_state() for it in halves])
    single = iterator(cfg)
    single.set_state(json.loads(json.dumps(merged)))
    for got, want in zip(take(single, 3), whole[3:]):
        assert_batches_equal(got, want)
    for it in halves:
        it.close()


def test_a_state_of_another_objective_is_refused(stdlib_data_dir):
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=2)
    causal = pipeline.make_iterator(cfg)
    causal_state = causal.get_state()
    causal.close()
    assert "objective" not in causal_state["meta"]  # causal LM's states are as they were
    masked = iterator(cfg)
    with pytest.raises(ValueError, match="objective"):
        masked.set_state(causal_state)
    masked_state = masked.get_state()
    masked.close()
    assert masked_state["meta"]["objective"] == {"name": "masked_lm", "mask_rate": 0.15,
                                                 "mask_id": MODEL_VOCAB - 1}
    with pytest.raises(ValueError, match="objective"):
        pipeline.make_iterator(cfg).set_state(masked_state)
    with pytest.raises(ValueError, match="mask_rate"):
        iterator(cfg, objective=mlm(mask_rate=0.2)).set_state(masked_state)
    # objective_cfg naming causal_lm is causal LM, state and all.
    plain = pipeline.make_iterator(cfg, objective_cfg=config.defaults().objective)
    plain.set_state(causal_state)
    plain.close()


@pytest.mark.parametrize("vocab", [None, 259])
def test_no_mask_id_is_one_clear_error(stdlib_data_dir, vocab):
    cfg = data_cfg(stdlib_data_dir, seq_len=64, global_batch_size=2)
    with pytest.raises(ConfigError, match=r"model\.vocab_size.*masked_lm.*259"):
        iterator(cfg, model_vocab_size=vocab)
