import numpy as np
import pytest

from jaxlm.data.tokenizers import ByteTokenizer, get_tokenizer


def test_special_ids_and_vocab():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)


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


def test_decode_skips_special_ids_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode("ab"), tok.pad_id, tok.eos_id, 300]
    assert tok.decode(ids) == "ab"
    assert tok.decode(np.array([0xFF + 3, ord("x") + 3])) == "\ufffdx"
    # Half of a multi-byte character.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


def test_unknown_tokenizer_is_named():
    with pytest.raises(ValueError, match="sentencepiece"):
        get_tokenizer("sentencepiece")
