"""Extractive QA rows: the answer's characters -> token span against brute-force references
(bytes: the UTF-8 length of the text before each character; a Hugging Face tokenizer: a
character -> token table filled one token at a time), the row layout, token types, the
length policy, and bad records as one error naming the line."""

import json

import numpy as np
import pytest
from encoder_runs import word_tokenizer

from jaxlm.data.tokenizers import ByteTokenizer, Tokenizer
from jaxlm.finetune import qa_data, records

FIELDS = qa_data.Fields("question", "context", "answers")
CONTEXTS = ["Zoë lives in Zürich. Ann is 34 years old.",
            "Ünïcode → arrows: Bob owns a fox, and 東京 is a city.",
            "  leading spaces, then words;  and  double  gaps.  "]


def brute_force_bytes(context: str, begin: int, end: int) -> tuple[int, int]:
    """Byte tokens: the answer's first byte is at the UTF-8 length of the text before it,
    its last one byte before the UTF-8 length of the text up to its end."""
    return len(context[:begin].encode()), len(context[:end].encode()) - 1


def brute_force_table(offsets, n_chars: int, begin: int, end: int) -> tuple[int, int] | None:
    """Which token covers each character (filled token by token), then the tokens of the
    answer's first and last covered characters."""
    owner = [None] * n_chars
    for t, (a, b) in enumerate(offsets):
        for c in range(a, b):
            if owner[c] is None:
                owner[c] = t
    covered = [owner[c] for c in range(begin, end) if owner[c] is not None]
    return (min(covered), max(covered)) if covered else None


def spans(context: str):
    """Every answer span [begin, end) of up to 8 characters that starts and ends on a
    non-space character."""
    for begin in range(len(context)):
        for end in range(begin + 1, min(begin + 9, len(context) + 1)):
            if not context[begin].isspace() and not context[end - 1].isspace():
                yield begin, end


@pytest.mark.parametrize("context", CONTEXTS)
def test_byte_spans_match_the_utf8_brute_force(context):
    tok = ByteTokenizer()
    ids, offsets = qa_data.token_offsets(tok, context)
    np.testing.assert_array_equal(ids, tok.encode(context))
    checked = 0
    for begin, end in spans(context):
        assert qa_data.char_span_to_tokens(offsets, begin, end) == \
            brute_force_bytes(context, begin, end), (begin, end)
        checked += 1
    assert checked > 150


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", CONTEXTS, "bert")


@pytest.mark.parametrize("context", CONTEXTS)
def test_hf_spans_match_the_table_brute_force(words, context):
    ids, offsets = qa_data.token_offsets(words, context)
    np.testing.assert_array_equal(ids, words.encode(context))
    assert [context[a:b] for a, b in offsets] == qa_data_words(context)
    for begin, end in spans(context):
        assert qa_data.char_span_to_tokens(offsets, begin, end) == \
            brute_force_table(offsets, len(context), begin, end), (begin, end)


def qa_data_words(context):
    import re
    return re.findall(r"\w+|[^\w\s]+", context)


def record(question, context, text, start=None, line=1):
    start = context.index(text) if start is None else start
    return records.Record(f"f.jsonl:{line}", {"question": question, "context": context,
                                              "answers": {"text": [text], "answer_start": [start]}})


def test_rows_hold_question_then_context_with_types_and_the_answer_span():
    tok = ByteTokenizer()
    recs = [record("Who?", "Bob owns a fox.", "fox"), record("Age?", "Ann is 34.", "34")]
    rows, examples, counts = qa_data.load_rows(recs, tok, 24, FIELDS, True, "error")
    assert (counts.examples, counts.skipped, counts.truncated) == (2, 0, 0)
    expected = [1, *tok.encode("Who?"), 2, *tok.encode("Bob owns a fox."), 2]
    np.testing.assert_array_equal(rows["inputs"][0], expected + [0] * (24 - len(expected)))
    np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 22 + [0] * 2)
    # types: 0 through the question's EOS, 1 from the context through its EOS, 0 padding
    np.testing.assert_array_equal(rows["token_types"][0], [0] * 6 + [1] * 16 + [0] * 2)
    np.testing.assert_array_equal(rows["context_mask"][0], [0] * 6 + [1] * 15 + [0] * 3)
    assert (rows["starts"][0], rows["ends"][0]) == (6 + 11, 6 + 13)
    for i, gold in enumerate(("fox", "34")):
        assert qa_data.span_text(examples[i], rows["starts"][i], rows["ends"][i]) == gold
        assert tok.decode(rows["inputs"][i, rows["starts"][i]:rows["ends"][i] + 1]) == gold
    one_type, _, _ = qa_data.load_rows(recs, tok, 24, FIELDS, False, "error")
    assert not one_type["token_types"].any()  # a model with one token type


def test_bert_style_rows_start_with_cls_and_end_with_sep(words):
    recs = [record("Who owns a fox ?", CONTEXTS[1], "fox")]
    rows, examples, _ = qa_data.load_rows(recs, words, 40, FIELDS, True, "error")
    ids = rows["inputs"][0]
    assert ids[0] == words.bos_id == words._tok.token_to_id("[CLS]")
    assert list(ids).count(words.eos_id) == 2 and words.eos_id == words._tok.token_to_id("[SEP]")
    s, e = rows["starts"][0], rows["ends"][0]
    assert words.decode(ids[s:e + 1]) == "fox" == qa_data.span_text(examples[0], s, e)


def test_a_long_context_is_cut_and_an_answer_outside_it_is_an_error_or_skipped():
    tok = ByteTokenizer()
    context = "Ann lives in Oslo. " + "Filler words here. " * 4 + "Bob lives in Rome."
    inside, outside = record("Ann?", context, "Oslo", line=1), record("Bob?", context, "Rome",
                                                                      line=2)
    with pytest.raises(records.DataError, match=r"f\.jsonl:2: the answer ends at context token"):
        qa_data.load_rows([inside, outside], tok, 48, FIELDS, True, "error")
    rows, examples, counts = qa_data.load_rows([inside, outside], tok, 48, FIELDS, True, "skip")
    assert (counts.examples, counts.skipped, counts.truncated) == (1, 1, 1)
    assert rows["context_mask"][0].sum() == 48 - 6 - 1 and rows["segment_ids"][0].all()
    assert len(examples[0].offsets) == 41
    long_question = record("?" * 60, "Ann lives in Oslo.", "Oslo", line=3)
    with pytest.raises(records.DataError, match=r"f\.jsonl:3: the question alone takes 62"):
        qa_data.load_rows([long_question], tok, 48, FIELDS, True, "error")


@pytest.mark.parametrize("value,message", [
    ({"context": "c", "answers": {"text": ["c"], "answer_start": [0]}},
     r"'question' must be a string \(missing\)"),
    ({"question": "q", "context": "abc", "answers": ["b"]}, r"'answers' must be an object"),
    ({"question": "q", "context": "abc", "answers": {"text": ["b"], "answer_start": []}},
     r"non-empty lists"),
    ({"question": "q", "context": "abc", "answers": {"text": ["b"], "answer_start": [0]}},
     r"the answer 'b' is not at answer_start 0 of the context \(found 'a'\)"),
    ({"question": "q", "context": "abc", "answers": {"text": ["b"], "answer_start": ["1"]}},
     r"integer answer_start"),
])
def test_a_bad_record_is_one_error_naming_its_line(value, message):
    rec = records.Record("data.jsonl:7", json.loads(json.dumps(value)))
    with pytest.raises(records.DataError, match=r"^data\.jsonl:7: .*" + message):
        qa_data.load_rows([rec], ByteTokenizer(), 32, FIELDS, True, "error")


class NoOffsets(ByteTokenizer):
    name = "sentencepiece"


def test_a_tokenizer_without_offsets_is_one_clear_error():
    assert isinstance(NoOffsets(), Tokenizer)
    with pytest.raises(records.DataError, match="'sentencepiece' tokenizer cannot give them"):
        qa_data.load_rows([record("q", "Ann is 3.", "3")], NoOffsets(), 32, FIELDS, True,
                          "error")
