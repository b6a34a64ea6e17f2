"""SFT and classification data: templates and loss masks against hand-built examples,
packing that keeps every example's own mask, segments and positions, deterministic batches,
and bad input reported with file:line before anything is compiled."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ft_helpers import sft_lines, write_jsonl

from jaxlm import config as config_lib
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.finetune import classify_data, records, rows, sft_data, templates
from jaxlm.finetune.records import DataError

TOK = ByteTokenizer()  # pad 0, bos 1, eos 2, byte b -> b + 3


def ids_of(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def test_prompt_tokens_have_zero_loss_weight(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "response": "yo"}])
    (example,), counts = sft_data.load_examples(records.read_jsonl(path),
                                                templates.BUILTIN["default"], TOK, 40, "error")
    # Hand-built: [BOS] "<|user|>\n" "hi\n" "<|assistant|>\n" | "yo\n" [EOS]
    prompt = [1] + ids_of("<|user|>\n") + ids_of("hi\n") + ids_of("<|assistant|>\n")
    response = ids_of("yo\n") + [2]
    assert example.ids.tolist() == prompt + response
    assert example.mask.tolist() == [False] * len(prompt) + [True] * len(response)
    assert counts.examples == 1
    row = sft_data.assemble([example], seq_len=40)
    n = len(prompt) + len(response)
    # Target t is token t + 1: weight 1 exactly for the response's tokens (and EOS).
    expected = np.zeros(40, np.float32)
    expected[len(prompt) - 1:n - 1] = 1.0
    np.testing.assert_array_equal(row["weights"], expected)
    np.testing.assert_array_equal(row["targets"][:n - 1], (prompt + response)[1:])
    assert row["segment_ids"].tolist() == [1] * n + [0] * (40 - n)


def test_chat_trains_every_assistant_turn_and_nothing_else():
    template = templates.BUILTIN["default"]
    messages = [("system", "be brief"), ("user", "a"), ("assistant", "b"), ("user", "c"),
                ("assistant", "d")]
    ids, mask = template.render(messages, TOK)
    trained = "".join(chr(i - 3) for i, m in zip(ids.tolist(), mask) if m and i > 2)
    assert trained == "b\nd\n"
    assert bool(mask[-1]) and ids[-1] == 2  # the final EOS is trained: the model learns to stop
    assert template.prompt_text([("user", "a")]) == "<|user|>\na\n<|assistant|>\n"


def test_template_file_and_its_errors(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"roles": {"user": {"prefix": "Q: "},
                                          "assistant": {"prefix": "A: ", "suffix": "\n"}}}))
    template = templates.load_template(str(good))
    ids, mask = template.render([("user", "x"), ("assistant", "y")], TOK)
    assert ids.tolist() == [1] + ids_of("Q: x") + ids_of("A: ") + ids_of("y\n") + [2]
    assert mask.sum() == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"roles": {"user": {"prefix": 3}}}))
    with pytest.raises(templates.TemplateError, match=r"bad\.json: roles\.user"):
        templates.load_template(str(bad))
    with pytest.raises(templates.TemplateError, match="neither a built-in"):
        templates.load_template(str(tmp_path / "missing.json"))


def test_packing_keeps_each_examples_mask_segments_and_positions(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", sft_lines(40, seed=5))
    examples, _ = sft_data.load_examples(records.read_jsonl(path), templates.BUILTIN["default"],
                                         TOK, 128, "error")
    packed = sft_data.pack(examples, 128, packing=True)
    single = sft_data.pack(examples, 128, packing=False)
    assert len(packed["inputs"]) < len(single["inputs"]) == len(examples)
    # Every segment of every packed row is exactly one example's own unpacked row.
    own = {tuple(r[s > 0].tolist()): (w, p) for r, s, w, p in zip(
        single["inputs"], single["segment_ids"], single["weights"], single["positions"])}
    found = 0
    for r in range(len(packed["inputs"])):
        seg = packed["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert idx.tolist() == list(range(idx[0], idx[-1] + 1))  # contiguous
            key = tuple(packed["inputs"][r, idx].tolist())
            weights, positions = own[key]
            np.testing.assert_array_equal(packed["positions"][r, idx], positions[:len(idx)])
            # The last token of a segment predicts the next example's BOS: never trained.
            np.testing.assert_array_equal(packed["weights"][r, idx[:-1]], weights[:len(idx) - 1])
            assert packed["weights"][r, idx[-1]] == 0 or idx[-1] == 127
            found += 1
    assert found == len(examples)
    assert packed["weights"].sum() == single["weights"].sum()


def test_batches_are_a_function_of_seed_and_step():
    data = {"x": np.arange(10)[:, None].repeat(3, 1)}
    a = rows.TrainBatches(data, 4, seed=7, local_rows=range(4))
    b = rows.TrainBatches(data, 4, seed=7, local_rows=range(4))
    assert [a.batch(s)["x"][:, 0].tolist() for s in (3, 1, 2)] == \
        [b.batch(s)["x"][:, 0].tolist() for s in (3, 1, 2)]
    first_epoch = np.concatenate([a.indices(s) for s in range(1, 3)] + [a.indices(3)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))  # an epoch sees every row once
    half = rows.TrainBatches(data, 4, seed=7, local_rows=[2, 3])
    assert half.batch(5)["x"].tolist() == a.batch(5)["x"][2:].tolist()
    evals = list(rows.eval_batches(data, 4, range(4)))
    assert len(evals) == 3 and evals[-1]["x"][2:].sum() == 0 and evals[-1]["x"][1, 0] == 9


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    recs = records.read_jsonl(write_jsonl(tmp_path / "s.jsonl", sft_lines(50)))
    train, held = records.split_eval(recs, 0.1, seed=0)
    assert len(held) == 5 and len(train) == 45
    assert not {r.where for r in train} & {r.where for r in held}
    assert [r.where for r in records.split_eval(recs, 0.1, seed=0)[1]] == [r.where for r in held]


def test_classification_rows_and_labels(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ab", "label": "pos"},
                                             {"text": "c", "label": "neg"}])
    data, skipped = classify_data.load_rows(records.read_jsonl(path), TOK, 8, "text", "label",
                                            2, ("neg", "pos"), "error")
    assert data["labels"].tolist() == [1, 0] and skipped == 0
    assert data["inputs"][0].tolist() == [1] + ids_of("ab") + [2, 0, 0, 0, 0]
    assert data["segment_ids"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


BAD_SFT = [
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": "b"\n',
     r"bad\.jsonl:3: not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n',
     r"bad\.jsonl:1: messages\[0\] has unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', r"bad\.jsonl:1: no assistant message"),
    ('{"prompt": "a"}\n', r"bad\.jsonl:1: \"response\" must be a string \(missing\)"),
    ('{"text": "a"}\n', r"bad\.jsonl:1: expected \"messages\" or \"prompt\" and \"response\""),
    ('{"prompt": "' + "x" * 80 + '", "response": "b"}\n',
     r"bad\.jsonl:1: the prompt alone is 105 tokens"),
]


@pytest.mark.parametrize("text,message", BAD_SFT)
def test_bad_sft_input_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        sft_data.load_examples(records.read_jsonl(path), templates.BUILTIN["default"], TOK,
                               64, "error")


def test_overlong_prompts_can_be_skipped_and_counted_and_responses_truncated(tmp_path):
    lines = [{"prompt": "x" * 80, "response": "b"}, {"prompt": "a", "response": "y" * 80},
             {"prompt": "a", "response": "b"}]
    recs = records.read_jsonl(write_jsonl(tmp_path / "s.jsonl", lines))
    examples, counts = sft_data.load_examples(recs, templates.BUILTIN["default"], TOK, 64, "skip")
    assert (counts.examples, counts.skipped_overlong, counts.truncated) == (2, 1, 1)
    assert len(examples[0].ids) == 65 and examples[0].mask[-1]


BAD_CLASSIFY = [
    ('{"text": "a"}\n', r"c\.jsonl:1: missing label 'label'"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 5}\n',
     r"c\.jsonl:2: label 5 is outside \[0, 2\)"),
    ('{"text": "a", "label": "maybe"}\n', r"c\.jsonl:1: label 'maybe' must be an integer"),
    ('{"label": 0}\n', r"c\.jsonl:1: 'text' must be a string \(missing\)"),
    ('{"text": "' + "x" * 20 + '", "label": 0}\n', r"c\.jsonl:1: the text is 22 tokens"),
    (b'{"text": "\xff", "label": 0}\n', r"c\.jsonl:1: not UTF-8"),
]


@pytest.mark.parametrize("text,message", BAD_CLASSIFY)
def test_bad_classification_input_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "c.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=message):
        classify_data.load_rows(records.read_jsonl(path), TOK, 16, "text", "label", 2, (), "error")


BAD_CONFIG = [
    ({"task": "regress"}, "config.finetune.task"),
    ({"method": "qlora"}, "config.finetune.method"),
    ({"base": ""}, "config.finetune.base"),
    ({"train_file": ""}, "config.finetune.train_file"),
    ({"overlong": "truncate"}, "config.finetune.overlong"),
    ({"task": "classify", "pooling": "max"}, "config.finetune.pooling"),
    ({"task": "classify", "num_labels": 1}, "config.finetune.num_labels"),
    ({"method": "lora", "lora.rank": 0}, "config.finetune.lora.rank"),
    ({"method": "lora", "lora.targets": "q,gate"}, "config.finetune.lora.targets"),
    ({"method": "lora", "lora.dropout": 1.0}, "config.finetune.lora.dropout"),
]


@pytest.mark.parametrize("overrides,key", BAD_CONFIG)
def test_bad_finetune_config_names_the_key(overrides, key):
    cfg = config_lib.defaults()
    cfg.finetune.update(task="sft", base="runs/tiny", train_file="x.jsonl")
    for k, v in overrides.items():
        section, _, leaf = k.rpartition(".")
        (cfg.finetune[section] if section else cfg.finetune)[leaf] = v
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate(cfg, 1)


def test_init_from_is_rejected_in_a_finetune_config():
    cfg = config_lib.defaults()
    cfg.finetune.update(task="sft", base="runs/tiny", train_file="x.jsonl")
    cfg.checkpoint.init_from = "runs/other"
    with pytest.raises(config_lib.ConfigError, match=r"config\.checkpoint\.init_from"):
        config_lib.validate(cfg, 1)
