"""Text-to-text rows: the packed encoder/decoder pairs reassemble every example in order
(inputs + EOS, targets + EOS, decoder inputs shifted right behind the start id, positions
from 0, weights on the targets), and the length policy."""

import numpy as np
import pytest

from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.finetune import records, seq2seq_data
from jaxlm.finetune.toy import translation_splits

START = 0


def segments(ids, segment_ids):
    """The pieces of a row, in order of segment id (1, 2, ...)."""
    return [ids[segment_ids == s] for s in range(1, int(segment_ids.max()) + 1)]


def test_packed_pairs_reassemble_the_examples():
    tok = ByteTokenizer()
    pairs = translation_splits(60, 1)[0]
    recs = [records.Record(f"t.jsonl:{i + 1}", p) for i, p in enumerate(pairs)]
    examples, counts = seq2seq_data.load_examples(recs, tok, "input", "target", 96, 80, "error")
    assert counts.examples == 60
    rows = seq2seq_data.pack(examples, 96, 80, START)
    assert rows["inputs"].shape[1] == 96 and rows["targets"].shape[1] == 80
    got_inputs, got_targets = [], []
    for r in range(len(rows["inputs"])):
        enc = segments(rows["inputs"][r], rows["input_segment_ids"][r])
        dec = segments(rows["targets"][r], rows["segment_ids"][r])
        shifted = segments(rows["decoder_inputs"][r], rows["segment_ids"][r])
        assert len(enc) == len(dec) >= 2  # several examples per pair
        for s, (targets, decoder_inputs) in enumerate(zip(dec, shifted), start=1):
            np.testing.assert_array_equal(decoder_inputs, [START, *targets[:-1]])
            np.testing.assert_array_equal(
                rows["positions"][r][rows["segment_ids"][r] == s], np.arange(len(targets)))
            np.testing.assert_array_equal(
                rows["input_positions"][r][rows["input_segment_ids"][r] == s],
                np.arange(len(enc[s - 1])))
        np.testing.assert_array_equal(rows["weights"][r], rows["segment_ids"][r] > 0)
        got_inputs += enc
        got_targets += dec
    for pair, inputs, targets in zip(pairs, got_inputs, got_targets):
        np.testing.assert_array_equal(inputs, [*tok.encode(pair["input"]), tok.eos_id])
        np.testing.assert_array_equal(targets, [*tok.encode(pair["target"]), tok.eos_id])
    assert len(got_inputs) == 60
    gen = seq2seq_data.generation_rows(examples, 96)
    for i, ex in enumerate(examples):
        np.testing.assert_array_equal(gen["inputs"][i][gen["input_segment_ids"][i] == 1],
                                      ex.inputs)
        assert gen["input_segment_ids"][i].sum() == len(ex.inputs)


def test_an_example_longer_than_its_row_is_an_error_naming_the_line_or_skipped():
    tok = ByteTokenizer()
    recs = [records.Record("t.jsonl:1", {"input": "short", "target": "ok"}),
            records.Record("t.jsonl:2", {"input": "short", "target": "far too long a target"})]
    with pytest.raises(records.DataError, match=r"^t\.jsonl:2: 6 input and 22 target tokens"):
        seq2seq_data.load_examples(recs, tok, "input", "target", 16, 8, "error")
    examples, counts = seq2seq_data.load_examples(recs, tok, "input", "target", 16, 8, "skip")
    assert (counts.examples, counts.skipped, len(examples)) == (1, 1, 1)
    with pytest.raises(records.DataError, match=r"^t\.jsonl:1: 'target' must be a string "
                                                r"\(missing\)"):
        seq2seq_data.load_examples([records.Record("t.jsonl:1", {"input": "x"})], tok,
                                   "input", "target", 16, 8, "error")
