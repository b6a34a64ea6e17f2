"""Tokenizers through `jaxlm convert from-hf` and `to-hf` for the bert and t5 families,
against transformers' own tokenizers, all built locally (no downloads).

BERT: a WordPiece tokenizer.json ([PAD] [UNK] [CLS] [SEP] [MASK], lowercasing,
BertProcessing) beside a tiny BertForMaskedLM, read by transformers' BertTokenizer.
RoBERTa: a byte-level BPE (<s> <pad> </s> <unk>, <mask> last, RobertaProcessing) beside a
tiny RobertaForMaskedLM, read by RobertaTokenizer. T5: a SentencePiece unigram model trained
here (pad 0, eos 1, unk 2, no BOS) as spiece.model beside a tiny T5ForConditionalGeneration,
read by T5Tokenizer (sentinels <extra_id_N> appended from the top id down; 100 by default,
tokenizer_config.json's extra_ids otherwise), and T5's fast tokenizer.json as transformers
saves it.

Each direction is checked against transformers: the imported run's tokenizer
(rundir.load_tokenizer) makes of every sentence exactly the ids of AutoTokenizer on the HF
directory (BERT: [CLS] text [SEP]; T5: text </s>), with its mask id and sentinel ids; the
export loads in AutoTokenizer with the same ids. Refusals are one error naming the key,
before anything is written.
"""

import io
import json
import shutil

import numpy as np
import pytest

from jaxlm import cli
from jaxlm.bench import convert as bench
from jaxlm.checkpoint import rundir
from jaxlm.convert import hf_export, hf_import
from jaxlm.convert import params as params_lib
from jaxlm.data import tokenizers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TEXT = """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
Hello world, this is a test of the tokenizer. Tokenizers split text into pieces.
Encoder-decoder models read an input and write an output, one token at a time.
Masked language models predict hidden words from the words around them.
Jaxlm converts checkpoints between formats; numbers like 12345 and 3.14159 appear too.
Sphinx of black quartz, judge my vow! Pack my box with five dozen liquor jugs.
Every sentence here is short, but together they give the trainer enough variety.
Rivers flow toward distant oceans while mountains watch silently over valleys.""".splitlines()
# Seen and unseen words, case, digits, punctuation, repeated spaces.
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello   WORLD, tokenizers!",
             "Zebras xylophone quietly 98765", "masked models predict words; 3.14"]

def hf_dir_of(model, directory):
    model.save_pretrained(directory)
    return directory


def bert_tokenizer_json() -> str:
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
    trainer = trainers.WordPieceTrainer(vocab_size=200, show_progress=False, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(TEXT * 10, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return tok.to_str()


def roberta_tokenizer_json() -> str:
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
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 10, trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0),
                                                      add_prefix_space=False)
    return tok.to_str()


PIECES = 120
T5_VOCAB = PIECES + 100 + 4  # as T5's table, a few rows beyond the tokenizer's ids


@pytest.fixture(scope="module")
def masked_lm_dirs(tmp_path_factory):
    """model type -> an HF directory: a tiny masked LM with its tokenizer."""
    dirs = {}
    for model_type, text, config_class, extra in (
            ("bert", bert_tokenizer_json(), transformers.BertConfig, dict(pad_token_id=0)),
            ("roberta", roberta_tokenizer_json(), transformers.RobertaConfig,
             dict(pad_token_id=1, bos_token_id=0, eos_token_id=2))):
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_str(text).get_vocab_size()
        config = config_class(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=24, max_position_embeddings=40,
                              vocab_size=vocab, **extra)
        model = transformers.AutoModelForMaskedLM.from_config(config)
        directory = hf_dir_of(model, tmp_path_factory.mktemp(model_type))
        (directory / "tokenizer.json").write_text(text)
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": f"{model_type.capitalize()}Tokenizer"}))
        dirs[model_type] = directory
    return dirs


@pytest.fixture(scope="module")
def t5_model_dir(tmp_path_factory):
    """A tiny T5 (1 encoder, 2 decoder layers) saved with a unigram SentencePiece model
    trained here with T5's special ids (pad 0, eos 1, unk 2, no BOS) as spiece.model."""
    config = transformers.T5Config(vocab_size=T5_VOCAB, d_model=16, d_kv=8, d_ff=24,
                                   num_layers=1, num_decoder_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    directory = hf_dir_of(model, tmp_path_factory.mktemp("t5_model"))
    spiece = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 30), model_writer=spiece,
                                   vocab_size=PIECES, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", minloglevel=2, num_threads=1)
    (directory / "spiece.model").write_bytes(spiece.getvalue())
    return directory


def t5_dir(t5_model_dir, directory, tokenizer_config=None):
    """A copy of the T5 directory, with tokenizer_config.json when given."""
    shutil.copytree(t5_model_dir, directory)
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


SENTINEL_NAMES = [f"<extra_id_{k}>" for k in range(100)]
# name -> (tokenizer_config.json or None, the sentinel count transformers gives)
T5_CASES = {
    "spiece_default": (None, 100),  # config.json says t5: T5Tokenizer's default 100
    "spiece_extra_ids": ({"tokenizer_class": "T5Tokenizer", "extra_ids": 7,
                          "additional_special_tokens": SENTINEL_NAMES[:7]}, 7),
    "fast_tokenizer_json": ({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}, 100),
}


def assert_same_ids(tok, hf_tok, sentinels=0):
    """The run's documents are transformers' input_ids; the special ids agree."""
    for text in SENTENCES:
        assert tok.document(tok.encode(text)).tolist() == hf_tok(text)["input_ids"], text
    assert tok.vocab_size == len(hf_tok)
    assert tok.pad_id == hf_tok.pad_token_id
    if sentinels:
        assert tok.sentinel_ids(sentinels) == hf_tok.convert_tokens_to_ids(
            SENTINEL_NAMES[:sentinels])


# ---- BERT and RoBERTa ------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_masked_lm_tokenizer_both_directions(model_type, masked_lm_dirs, tmp_path):
    hf_dir = masked_lm_dirs[model_type]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert type(hf_tok).__name__ == f"{model_type.capitalize()}Tokenizer"
    config = json.loads((hf_dir / "config.json").read_text())
    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    tok = rundir.load_tokenizer(tmp_path / "run")
    assert tok.name == "hf" and tok.adds_bos
    assert_same_ids(tok, hf_tok)
    assert (tok.bos_id, tok.eos_id, tok.mask_id) == (
        hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.mask_token_id)
    assert tok.pad_id == config["pad_token_id"]
    if model_type == "roberta":
        assert (tok.bos_id, tok.eos_id) == (config["bos_token_id"], config["eos_token_id"])
    assert tok.mask_id == (4 if model_type == "bert" else len(hf_tok) - 1)
    assert hf_tok.mask_token_id not in tok.encode(" ".join(SENTENCES)).tolist()

    assert cli.main(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert_same_ids(tok, back)
    assert (back.mask_token_id, back.cls_token_id, back.sep_token_id, back.bos_token_id) == \
        (tok.mask_id, tok.bos_id, tok.eos_id, tok.bos_id)
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert settings["mask_token"] == ("[MASK]" if model_type == "bert" else "<mask>")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == tok.pad_id
    masked = back("the [MASK] dog" if model_type == "bert" else "the<mask> dog")["input_ids"]
    assert tok.mask_id in masked  # transformers reads the named mask token in text


# ---- T5 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(T5_CASES))
def test_t5_tokenizer_both_directions(case, t5_model_dir, tmp_path):
    settings, sentinels = T5_CASES[case]
    hf_dir = t5_dir(t5_model_dir, tmp_path / "hf_in", settings)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert type(hf_tok).__name__ == "T5Tokenizer"
    if case == "fast_tokenizer_json":  # transformers' own tokenizer.json beside spiece.model
        hf_tok.save_pretrained(hf_dir)
        assert (hf_dir / "tokenizer.json").is_file()
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert len(hf_tok) == PIECES + sentinels
    config = json.loads((hf_dir / "config.json").read_text())

    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    tok = rundir.load_tokenizer(tmp_path / "run")
    assert tok.name == ("hf" if case == "fast_tokenizer_json" else "sentencepiece")
    assert_same_ids(tok, hf_tok, sentinels)
    assert tok.eos_id == hf_tok.eos_token_id
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.adds_bos, tok.mask_id) == \
        (config["pad_token_id"], config["eos_token_id"], None, False, None)
    assert tok.decoder_start_id == config["decoder_start_token_id"]
    assert tok.sentinels[0] == len(hf_tok) - 1 and len(tok.sentinels) == sentinels
    with pytest.raises(ValueError, match=f"{sentinels} sentinel"):
        tok.sentinel_ids(sentinels + 1)

    assert cli.main(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    written = {p.name for p in (tmp_path / "hf").iterdir()}
    exported = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    if tok.name == "hf":
        assert "tokenizer.json" in written and "spiece.model" not in written
    else:
        assert {"spiece.model", "tokenizer_config.json"} <= written
        assert "tokenizer.model" not in written and "tokenizer.json" not in written
        assert (exported["tokenizer_class"], exported["extra_ids"]) == ("T5Tokenizer", sentinels)
        assert (exported["pad_token"], exported["eos_token"], exported["unk_token"]) == \
            ("<pad>", "</s>", "<unk>")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert_same_ids(tok, back, sentinels)
    assert tok.eos_id == back.eos_token_id
    assert back.convert_tokens_to_ids("<extra_id_0>") == tok.sentinel_ids(1)[0]


def test_config_ids_replace_the_files_but_keep_sentinels_and_mask(t5_model_dir, masked_lm_dirs,
                                                                  tmp_path, hf_models_module):
    """config.json's ids win over the tokenizer's; the rebuilt tokenizer keeps the
    SentencePiece model's sentinels and the tokenizer.json's mask token."""
    hf_dir = t5_dir(t5_model_dir, tmp_path / "t5", {"extra_ids": 5})
    hf_models_module.edit_config(hf_dir, eos_token_id=3, pad_token_id=2)
    tok = hf_import.load_tokenizer(hf_import.open_checkpoint(hf_dir))
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (3, 2, PIECES + 5)
    assert tok.sentinel_ids(5) == [PIECES + 4 - k for k in range(5)]

    bert = tmp_path / "bert"
    shutil.copytree(masked_lm_dirs["bert"], bert)
    hf_models_module.edit_config(bert, pad_token_id=1)  # [UNK]
    tok = hf_import.load_tokenizer(hf_import.open_checkpoint(bert))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.adds_bos) == (1, 2, 3, 4, True)


@pytest.mark.parametrize("settings,fragment", [
    pytest.param({"extra_ids": 105},
                 f"has {PIECES + 105} ids but the model's vocab_size is {T5_VOCAB}",
                 id="more_ids_than_the_model"),
    pytest.param({"additional_special_tokens": SENTINEL_NAMES[:3]},
                 "additional_special_tokens lists 3 <extra_id_N> tokens but extra_ids is 100",
                 id="sentinel_count_mismatch"),
    pytest.param({"extra_ids": 0, "additional_special_tokens": SENTINEL_NAMES[:3]},
                 "additional_special_tokens lists 3 <extra_id_N> tokens with extra_ids 0",
                 id="sentinels_in_list_order"),
    pytest.param({"extra_ids": -1}, "extra_ids must be an integer >= 0", id="bad_extra_ids"),
])
def test_t5_tokenizers_transformers_cannot_match_are_refused(settings, fragment, t5_model_dir,
                                                             tmp_path, capsys):
    hf_dir = t5_dir(t5_model_dir, tmp_path / "hf", settings)
    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert "tokenizer_config.json" in err[0] or "spiece.model" in err[0]
    assert not (tmp_path / "run").exists()


# ---- exports refused before anything is written --------------------------------------------

def write_run(run, model_cfg, tok, hf_models_module):
    """A jaxlm run of random parameters with tokenizer `tok`."""
    shapes, axes = params_lib.abstract_params(model_cfg)
    flat = hf_models_module.random_jaxlm_params({k: v.shape for k, v in shapes.items()}, 0)
    run.mkdir()
    params_lib.write_checkpoint(run, params_lib.run_config(model_cfg, run, tok.name), flat,
                                axes, tok.name)
    tok.save(run / "tokenizer")


def t5_cfg(t5_model_dir):
    """The tiny T5's model config with room for 352 ids."""
    model_cfg = hf_import.open_checkpoint(t5_model_dir).model_cfg
    model_cfg.vocab_size = 352
    return model_cfg


@pytest.fixture(scope="module")
def jaxlm_sentencepiece(tmp_path_factory):
    """A SentencePiece model as jaxlm trains them: BPE, pad 0 unk 1 bos 2 eos 3, byte
    fallback, no dummy prefix (not T5Tokenizer's kind), 340 ids."""
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    return tokenizers.train_sentencepiece(iter(TEXT * 20), path, 340).read_bytes()


@pytest.mark.parametrize("case", ["roberta_pad", "sentinels_not_t5"])
def test_refused_export_writes_nothing(case, t5_model_dir, jaxlm_sentencepiece, tmp_path,
                                       hf_models_module):
    if case == "roberta_pad":  # RoBERTa positions from row 2 need pad 1; the byte pad is 0
        model_cfg = hf_import.open_checkpoint(
            bench_dir(tmp_path / "src", "roberta", hf_models_module)).model_cfg
        tok, fragment = tokenizers.ByteTokenizer(), "the tokenizer's pad id must be 1; it is 0"
    else:
        model_cfg = t5_cfg(t5_model_dir)
        tok = tokenizers.SentencePieceTokenizer(jaxlm_sentencepiece, extra_ids=3)
        fragment = ("has 3 sentinels (<extra_id_N>), which only transformers' T5Tokenizer "
                    "places as jaxlm does, but it is a BPE model")
    write_run(tmp_path / "run", model_cfg, tok, hf_models_module)
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(hf_import.ConversionError) as e:
            hf_export.export_hf(tmp_path / "run", out, log=lambda _: None)
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not out.exists() if out.name == "new" else not any(out.iterdir())


def test_t5_run_with_another_sentencepiece_model_exports_for_llama_tokenizer(
        t5_model_dir, jaxlm_sentencepiece, tmp_path, hf_models_module):
    """Without sentinels, a SentencePiece model T5Tokenizer would misread goes to
    LlamaTokenizer, which gives the run's ids."""
    model_cfg = t5_cfg(t5_model_dir)
    tok = tokenizers.SentencePieceTokenizer(jaxlm_sentencepiece)
    write_run(tmp_path / "run", model_cfg, tok, hf_models_module)
    notes = []
    hf_export.export_hf(tmp_path / "run", tmp_path / "hf", log=notes.append)
    assert any("not T5's (it is a BPE model" in n for n in notes), notes
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "LlamaTokenizer"
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SENTENCES:
        assert back(text)["input_ids"] == tok.start_ids() + tok.encode(text).tolist(), text


# ---- the benchmark's random checkpoints, any family ---------------------------------------

def bench_dir(directory, model_type, hf_models_module):
    """bench.write_random_hf of a tiny model of `model_type` (t5: 1 encoder, 2 decoder
    layers; roberta: positions from row 2, pad 1)."""
    overrides = {"t5": dict(family="t5", n_decoder_layers=2, n_layers=1, gated_mlp=True,
                            activation="gelu_tanh", tie_embeddings=False),
                 "roberta": dict(family="bert", position_offset=2, activation="gelu")}[model_type]
    cfg = hf_models_module.tiny_cfg(**overrides)
    bench.write_random_hf(directory, cfg, shards=2)
    return directory


@pytest.mark.parametrize("model_type", ["t5", "roberta"])
def test_bench_writes_any_family(model_type, hf_models_module, tmp_path):
    hf_dir = bench_dir(tmp_path / "hf", model_type, hf_models_module)
    auto = getattr(transformers, hf_export.auto_class(
        "t5" if model_type == "t5" else "bert"))
    model, info = auto.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if model_type == "t5":
        assert (model.config.num_layers, model.config.num_decoder_layers) == (1, 2)
    ckpt = hf_import.open_checkpoint(hf_dir)
    assert ckpt.depths == params_lib.stack_depths(ckpt.model_cfg)
    tok = hf_import.load_tokenizer(ckpt)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
        model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
    assert np.isclose(float(model.get_input_embeddings().weight.detach().std()), 0.02, rtol=0.1)
