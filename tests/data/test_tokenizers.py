import hashlib
import json
import os
import pickle
import sys

import ml_collections
import numpy as np
import pytest

from jaxlm.data import tokenizers as T

try:
    from jaxlm.data.sources import stdlib_files
except ImportError:  # sources as a package that does not re-export it
    from jaxlm.data.sources.stdlib import stdlib_files
from jaxlm.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    get_tokenizer,
    load_saved,
    load_tokenizer,
    padded_vocab_size,
    train_sentencepiece,
)

# Text that a normalizing or whitespace-collapsing tokenizer would change.
ODD_TEXTS = [
    "",
    "hello, world\n",
    "héllo ✓ 中文 𝄞 \x00\x7f",
    "  leading, trailing  \n",
    "tabs\tand\r\nCRLF\n\n\n   \x0b\x0c\u2028\u2029end",
    "nbsp\u00a0ideographic\u3000space",
    "e\u0301 vs é, ﬁ, Å (NFKC would fold these)",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # ünïcödé 🙂\n",
    "12345678901234567890",
    "</s> <s> <pad> <|endoftext|>",  # spelled special tokens are text
]


def data_cfg(tokenizer, path=""):
    return ml_collections.ConfigDict({"tokenizer": tokenizer, "tokenizer_path": str(path)})


# --------------------------------------------------------------------------------- byte


def test_special_ids_and_vocab():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert tok.name == "byte"
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    assert isinstance(load_tokenizer(data_cfg("byte")), ByteTokenizer)


@pytest.mark.parametrize("text", ["", "hello, world\n", "héllo ✓ 中文 𝄞 \x00\x7f"])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    # One id per UTF-8 byte, shifted by 3; no BOS/EOS added.
    np.testing.assert_array_equal(ids, np.frombuffer(text.encode("utf-8"), np.uint8) + 3)
    assert ids.size == 0 or (ids.min() >= 3 and ids.max() < 259)
    assert tok.decode(ids) == text


def test_non_ascii_is_multi_byte():
    ids = ByteTokenizer().encode("é")
    assert ids.tolist() == [0xC3 + 3, 0xA9 + 3]


def test_byte_encode_bytes_maps_invalid_utf8_directly():
    assert ByteTokenizer().encode_bytes(b"\xff\x00a").tolist() == [0xFF + 3, 3, ord("a") + 3]


def test_decode_skips_special_ids_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode("ab"), tok.pad_id, tok.eos_id, 300, -1]
    assert tok.decode(ids) == "ab"
    assert tok.decode(iter(ids)) == "ab"
    assert tok.decode(np.array([0xFF + 3, ord("x") + 3])) == "\ufffdx"
    # Half of a multi-byte character.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_get_tokenizer_only_builds_byte():
    with pytest.raises(ValueError, match="load_tokenizer"):
        get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="'nope'"):
        get_tokenizer("nope")


# ------------------------------------------------------------------------ sentencepiece

SP_VOCAB = 1000


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def corpus():
    """~300 KB of stdlib sources to train on, and other stdlib files held out."""
    files = [path for _, path in stdlib_files()]
    train, size = [], 0
    for path in files[::7]:
        train.append(_read(path))
        size += len(train[-1].encode())
        if size > 300_000:
            break
    held_out = [_read(path) for path in files[1::7][:20]]
    return train, held_out


@pytest.fixture(scope="module")
def sp_path(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "nested" / "sp.model"
    assert train_sentencepiece(corpus[0], path, SP_VOCAB) == path
    return path


@pytest.fixture(scope="module")
def sp(sp_path):
    return load_tokenizer(data_cfg("sentencepiece", sp_path))


def test_sentencepiece_special_ids(sp, sp_path):
    import sentencepiece as spm
    assert isinstance(sp, SentencePieceTokenizer) and sp.name == "sentencepiece"
    assert (sp.vocab_size, sp.pad_id, sp.bos_id, sp.eos_id) == (SP_VOCAB, 0, 2, 3)
    raw = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert [raw.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert raw.unk_id() == 1
    # Byte pieces follow the four specials: byte b is id b + 4.
    assert [raw.id_to_piece(i) for i in (4, 4 + 0xFF)] == ["<0x00>", "<0xFF>"]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_sentencepiece_round_trips_exactly(sp, text):
    ids = sp.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert sp.decode(ids) == text
    # Never a special id (no BOS/EOS added, byte fallback instead of <unk>).
    assert ids.size == 0 or (ids.min() >= 4 and ids.max() < SP_VOCAB)


def test_sentencepiece_byte_fallback_and_known_exception(sp):
    # A character unseen in training becomes its UTF-8 bytes.
    assert sp.encode("𝄞").tolist() == [b + 4 for b in "𝄞".encode()]
    # Documented exception: U+2581 is SentencePiece's own space symbol.
    assert sp.decode(sp.encode("a\u2581b")) == "a b"


def test_sentencepiece_keeps_code_structure(sp):
    ids = sp.encode("        return self\n")
    # Indentation, keyword and line end are few pieces, not one per character.
    assert len(ids) <= 6, [sp._sp.id_to_piece(int(i)) for i in ids]
    # Digits are split one per piece.
    assert len(sp.encode("2024")) == 4


def test_sentencepiece_compresses_python(sp, corpus):
    text = "".join(corpus[1])  # files not trained on
    n_bytes = len(text.encode("utf-8"))
    ratio = len(sp.encode(text)) / n_bytes
    assert n_bytes > 50_000
    assert 0.15 < ratio < 0.5, ratio  # byte tokenizer: 1.0
    assert sp.decode(sp.encode(text)) == text


def test_sentencepiece_decode_skips_specials_and_out_of_range(sp):
    ids = sp.encode("abc")
    assert sp.decode([sp.bos_id, *ids, sp.eos_id, sp.pad_id, SP_VOCAB, 10**6, -1]) == "abc"


def test_sentencepiece_encode_bytes(sp):
    assert sp.encode_bytes("é x".encode()).tolist() == sp.encode("é x").tolist()
    assert sp.encode_bytes(b"a\xffb").tolist() == sp.encode("a\ufffdb").tolist()


def test_sentencepiece_training_is_deterministic(corpus, sp_path, tmp_path):
    again = train_sentencepiece(corpus[0], tmp_path / "again.model", SP_VOCAB)
    assert again.read_bytes() == sp_path.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name != "again.model"]  # no temp files left
    # Nothing machine-dependent is stored (the thread count is; it must be a constant).
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = model_pb2.ModelProto.FromString(again.read_bytes())
    assert proto.trainer_spec.num_threads == 16
    assert proto.trainer_spec.split_digits and proto.trainer_spec.byte_fallback
    assert proto.trainer_spec.input_sentence_size == 0  # no sampling
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.add_dummy_prefix


def test_sentencepiece_trains_on_lines_longer_than_max_sentence_length(tmp_path):
    # One 120 KB line: fed whole, the trainer drops it (max_sentence_length) and fails with
    # no sentences left. Cut, it learns merges of it.
    path = train_sentencepiece([" ".join(["zebra"] * 20_000)], tmp_path / "z.model", 270)
    ids = SentencePieceTokenizer.from_file(path).encode("zebra zebra")
    assert len(ids) == 4 and ids.min() >= 4 + 256  # "ze" "bra" "▁ze" "bra", no byte pieces


def test_training_chunks_keep_text_and_respect_size():
    text = "short line\n" * 1000 + "x" * 10_000 + "\n" + "é" * 3000 + "\ntail"
    chunks = list(T._chunks(text))
    assert "".join(chunks) == text
    assert max(len(c.encode()) for c in chunks) <= 4096
    assert [len(c) for c in chunks[:2]] == [11 * 372] * 2  # whole lines while they fit
    assert len(list(T._training_sentences([text, text.encode()], 5))) == 5


def test_train_sentencepiece_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(["a"], tmp_path / "m.model", 300, model_type="word")
    with pytest.raises(ValueError, match="too high"):
        train_sentencepiece(["tiny corpus"], tmp_path / "m.model", 5000)
    assert not (tmp_path / "m.model").exists()


# ----------------------------------------------------------------------------------- hf


def _hf_bpe(specials=("<pad>", "<s>", "</s>")):
    from tokenizers import Tokenizer as HFLib
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFLib(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["hello world", "hello there", "def f(x): return x + 1"] * 20,
                            trainer=trainer)
    return tok


@pytest.fixture
def hf_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    _hf_bpe().save(str(path))
    return path


def test_hf_loads_encodes_like_the_library_and_reports_specials(hf_path):
    from tokenizers import Tokenizer as HFLib
    lib = HFLib.from_file(str(hf_path))
    tok = load_tokenizer(data_cfg("hf", hf_path))
    assert isinstance(tok, HFTokenizer) and tok.name == "hf"
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # trainer order of specials
    assert tok.vocab_size == max(lib.get_vocab(with_added_tokens=True).values()) + 1
    for text in ODD_TEXTS[:-1]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == lib.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text  # byte-level BPE round-trips
    ids = tok.encode("hello world")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, 10**6, -3]) == "hello world"


def test_hf_spelled_special_tokens_are_text(hf_path):
    from tokenizers import Tokenizer as HFLib
    tok = load_tokenizer(data_cfg("hf", hf_path))
    ids = tok.encode("a </s> b").tolist()
    assert tok.eos_id not in ids and len(ids) > 3
    assert tok.decode(ids) == "a </s> b"
    assert 2 in HFLib.from_file(str(hf_path)).encode("a </s> b").ids  # the library's default


def test_hf_ignores_post_processor_padding_and_truncation(tmp_path):
    from tokenizers import processors
    lib = _hf_bpe()
    plain = lib.encode("hello world, hello there", add_special_tokens=False).ids
    lib.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    lib.enable_truncation(max_length=3)
    lib.enable_padding(length=64, pad_id=0, pad_token="<pad>")
    lib.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(data_cfg("hf", tmp_path))  # a directory holding tokenizer.json
    assert len(plain) > 3
    assert tok.encode("hello world, hello there").tolist() == plain


@pytest.mark.parametrize("specials, expected", [
    (("<s>", "</s>"), (1, 0, 1)),  # no pad token: pad = eos
    (("<|endoftext|>",), (0, None, 0)),  # GPT-2 style: eos only
    (("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"), (1, 0, 1)),
    ((), (0, None, None)),  # nothing special: pad 0
])
def test_hf_special_token_rules(tmp_path, specials, expected):
    path = tmp_path / "tokenizer.json"
    _hf_bpe(specials).save(str(path))
    tok = HFTokenizer.from_file(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == expected


def test_hf_plain_vocabulary_entries_are_not_specials(tmp_path):
    from tokenizers import Tokenizer as HFLib
    from tokenizers import models, pre_tokenizers
    lib = HFLib(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2, "[UNK]": 3}, unk_token="[UNK]"))
    lib.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    lib.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (4, 0, None, None)
    assert tok.encode("hi <s> x").tolist() == [2, 0, 3]
    assert tok.decode([0, 2]) == "<s> hi"  # fallback pad 0 is a real token: kept


def test_hf_missing_package_is_explained(hf_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"jaxlm\[hf\]"):
        load_tokenizer(data_cfg("hf", hf_path))


# --------------------------------------------------------------------- save / load_saved


@pytest.fixture(params=["byte", "sentencepiece", "hf"])
def any_tok(request, tmp_path):
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "hf":
        path = tmp_path / "src" / "tokenizer.json"
        path.parent.mkdir()
        _hf_bpe(("<s>", "</s>")).save(str(path))
        return load_tokenizer(data_cfg("hf", path))
    return request.getfixturevalue("sp")


def test_save_load_saved_round_trip(any_tok, tmp_path):
    out = tmp_path / "run" / "tokenizer"
    any_tok.save(out)
    any_tok.save(out)  # overwriting is fine
    config = json.loads((out / T.SAVED_CONFIG).read_text())
    assert config["type"] == any_tok.name
    if any_tok.name != "byte":
        model = (out / config["file"]).read_bytes()
        assert hashlib.sha256(model).hexdigest() == config["sha256"] == any_tok.fingerprint
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    loaded = load_saved(out)
    assert type(loaded) is type(any_tok)
    assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == \
        (any_tok.vocab_size, any_tok.pad_id, any_tok.bos_id, any_tok.eos_id)
    for text in ODD_TEXTS:
        np.testing.assert_array_equal(loaded.encode(text), any_tok.encode(text))
        assert loaded.decode(loaded.encode(text)) == any_tok.decode(any_tok.encode(text))
    # The same directory also works as data.tokenizer_path.
    assert load_tokenizer(data_cfg(any_tok.name, out)).vocab_size == any_tok.vocab_size
    # And the tokenizer survives pickling (process-based data loaders).
    clone = pickle.loads(pickle.dumps(any_tok))
    assert clone.encode(ODD_TEXTS[7]).tolist() == any_tok.encode(ODD_TEXTS[7]).tolist()


def test_load_saved_keeps_the_recorded_special_ids(sp, tmp_path):
    sp.save(tmp_path)
    config = json.loads((tmp_path / T.SAVED_CONFIG).read_text())
    config["pad_id"] = 3  # e.g. saved by a version with another fallback rule
    (tmp_path / T.SAVED_CONFIG).write_text(json.dumps(config))
    assert load_saved(tmp_path).pad_id == 3
    config["bos_id"] = SP_VOCAB
    (tmp_path / T.SAVED_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bos_id"):
        load_saved(tmp_path)


def test_load_saved_errors(sp, tmp_path):
    with pytest.raises(FileNotFoundError, match=T.SAVED_CONFIG):
        load_saved(tmp_path / "nowhere")
    sp.save(tmp_path)
    with (tmp_path / "tokenizer.model").open("ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="sha256"):
        load_saved(tmp_path)
    (tmp_path / T.SAVED_CONFIG).write_text('{"type": "sentencepiece", "format": 1, '
                                           '"file": "../etc/passwd"}')
    with pytest.raises(ValueError, match="file name"):
        load_saved(tmp_path)
    (tmp_path / T.SAVED_CONFIG).write_text('{"type": "bpe", "format": 1}')
    with pytest.raises(ValueError, match="'bpe'"):
        load_saved(tmp_path)
    (tmp_path / T.SAVED_CONFIG).write_text("not json")
    with pytest.raises(ValueError, match=T.SAVED_CONFIG):
        load_saved(tmp_path)
    ByteTokenizer().save(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'byte' tokenizer"):
        load_tokenizer(data_cfg("hf", tmp_path))


# ------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["sentencepiece", "hf"])
def test_missing_file_names_path_and_key(name, tmp_path):
    missing = tmp_path / "no" / "such.file"
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(data_cfg(name, missing))
    assert str(missing) in str(e.value) and "data.tokenizer_path" in str(e.value)
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path"):
        load_tokenizer(data_cfg(name, ""))
    with pytest.raises(FileNotFoundError, match="tokenizer"):  # a directory without a model
        load_tokenizer(data_cfg(name, tmp_path))


def test_tilde_is_expanded(sp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(sp_path.parent))
    tok = load_tokenizer(data_cfg("sentencepiece", "~/" + sp_path.name))
    assert tok.vocab_size == SP_VOCAB


@pytest.mark.parametrize("content", [b"", b"garbage, not a model\n", b'{"x": 1}', b"\xff\xfe\x00"])
@pytest.mark.parametrize("name", ["sentencepiece", "hf"])
def test_garbage_file_names_path(name, content, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_tokenizer(data_cfg(name, path))
    assert str(path) in str(e.value)


def test_wrong_kind_of_model_names_path(sp_path, hf_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(data_cfg("sentencepiece", hf_path))
    with pytest.raises(ValueError, match=str(sp_path)):
        load_tokenizer(data_cfg("hf", sp_path))


def test_unknown_tokenizer_names_key():
    with pytest.raises(ValueError, match=r"data\.tokenizer: unknown tokenizer 'tiktoken'"):
        load_tokenizer(data_cfg("tiktoken", "/x"))


def test_padded_vocab_size():
    assert padded_vocab_size(259, 128) == 384
    assert padded_vocab_size(256, 128) == 256
    assert padded_vocab_size(257, 128) == 384
    assert padded_vocab_size(1000, 1) == 1000
    assert padded_vocab_size(0, 8) == 0
    with pytest.raises(ValueError):
        padded_vocab_size(10, 0)
    with pytest.raises(ValueError):
        padded_vocab_size(-1, 8)


def test_save_writes_readable_files(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / T.SAVED_CONFIG).read_text())["type"] == "byte"
    assert os.stat(tmp_path / T.SAVED_CONFIG).st_mode & 0o044 == 0o044
