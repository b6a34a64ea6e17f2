"""The BOS convention (`Tokenizer.adds_bos`): derived from a tokenizer.json's post-processor
as the `tokenizers` library applies it, saved with the tokenizer (older saves keep BOS),
and asked by every place that starts a sequence (pipeline, prompts, the resume check)."""

import json
import pickle

import numpy as np
import pytest

from jaxlm.data import pipeline
from jaxlm.data import tokenizers as T
from jaxlm.infer.generate import encode_prompt
from jaxlm.train import compat

pytest.importorskip("tokenizers")

TEXT = "hello world, hello there"


def _processor(kind):
    from tokenizers import processors
    return {
        "none": None,
        "bytelevel": processors.ByteLevel(trim_offsets=False),  # GPT-2
        "template": processors.TemplateProcessing(  # Llama
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]),
        "template_eos_only": processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 2)]),
        "sequence": processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                         processors.TemplateProcessing(
                                             single="<s> $A", special_tokens=[("<s>", 1)])]),
        "roberta": processors.RobertaProcessing(("</s>", 2), ("<s>", 1)),
        "bert_cls": processors.BertProcessing(("[SEP]", 4), ("[CLS]", 3)),
    }[kind]


def _library_tokenizer(kind):
    """A byte-level BPE with <pad> <s> </s> [CLS] [SEP] = 0..4 and the given post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"] + (["[CLS]", "[SEP]"] if kind == "bert_cls" else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    tok.post_processor = _processor(kind)
    return tok


@pytest.mark.parametrize("kind,bos_id,adds_bos", [
    ("none", 1, False), ("bytelevel", 1, False), ("template", 1, True),
    ("template_eos_only", 1, False), ("sequence", 1, True), ("roberta", 1, True),
    ("bert_cls", 3, True)])  # the one token the post-processor prepends is the BOS
def test_hf_start_follows_the_post_processor(kind, bos_id, adds_bos, tmp_path):
    lib = _library_tokenizer(kind)
    lib.save(str(tmp_path / "tokenizer.json"))
    tok = T.HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.adds_bos) == (bos_id, adds_bos)
    expected = lib.encode(TEXT).ids  # the library, special tokens and all
    closed = kind in ("template_eos_only", "roberta", "bert_cls")  # a closing token appended
    assert encode_prompt(tok, TEXT).tolist() == (expected[:-1] if closed else expected)
    document = pipeline._Tokenize(tok)({"text": TEXT}).tolist()
    # A document closes with the EOS: the single token the post-processor appends (BERT's
    # [SEP], RoBERTa's </s>), so a document is what the library makes of the text.
    assert document == (expected[:-1] if closed else expected) + [tok.eos_id]
    if closed:
        assert document == expected and tok.eos_id == expected[-1]


@pytest.mark.parametrize("kind", ["none", "template"])
def test_convention_is_saved_pickled_and_kept_by_older_saves(kind, tmp_path):
    _library_tokenizer(kind).save(str(tmp_path / "tokenizer.json"))
    tok = T.HFTokenizer.from_file(tmp_path / "tokenizer.json")
    tok.save(tmp_path / "saved")
    assert T.load_saved(tmp_path / "saved").adds_bos == tok.adds_bos == (kind == "template")
    assert pickle.loads(pickle.dumps(tok)).adds_bos == tok.adds_bos
    config_path = tmp_path / "saved" / T.SAVED_CONFIG
    config = json.loads(config_path.read_text())
    del config["adds_bos"]  # a run saved before the convention was recorded trained with BOS
    config_path.write_text(json.dumps(config))
    old = T.load_saved(tmp_path / "saved")
    assert old.adds_bos and encode_prompt(old, "hi").tolist() == [1] + old.encode("hi").tolist()
    # The resume check tells the conventions apart (a run never switches silently).
    assert (compat.tokenizer_identity(old) == compat.tokenizer_identity(tok)) == tok.adds_bos
    config.update(adds_bos=True, bos_id=None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="adds_bos"):
        T.load_saved(tmp_path / "saved")


def test_byte_and_sentencepiece_start_with_bos(tmp_path):
    byte = T.ByteTokenizer()
    assert byte.adds_bos and encode_prompt(byte, "ab").tolist() == [1, 100, 101]
    byte.save(tmp_path / "byte")
    assert json.loads((tmp_path / "byte" / T.SAVED_CONFIG).read_text())["adds_bos"] is True
    model = T.train_sentencepiece(["the quick brown fox jumps"] * 50, tmp_path / "sp.model", 300)
    sp = T.SentencePieceTokenizer.from_file(model)
    assert sp.adds_bos and encode_prompt(sp, "the fox")[0] == sp.bos_id == T.SP_BOS_ID
    assert np.array_equal(encode_prompt(sp, "the fox")[1:], sp.encode("the fox"))
