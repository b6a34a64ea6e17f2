"""`jaxlm classify` on a LoRA classifier of the toy set (configs/classify_tiny.py on the tiny
base): its labels over the held-out examples reproduce the accuracy `jaxlm eval` reports
for the run, texts given on the command line are labelled by name with probabilities, and
bad input is exit 2 with one line naming it."""

from __future__ import annotations

import json
import pathlib

import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from ft_helpers import finetune, write_jsonl

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.finetune import records

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
LABELS = ["import", "function", "loop", "assignment"]


@pytest.fixture(scope="module")
def classifier(base_run, tmp_path_factory):
    """12 LoRA steps of configs/classify_tiny.py on the tiny base; (workdir, config)."""
    cfg = config_lib.load_config_file(CONFIGS / "classify_tiny.py")
    cfg.finetune.update(base=str(base_run[0]))
    cfg.train.update(steps=12, eval_every=12)  # evaluate at the start and the end
    cfg.metrics.update(tensorboard=False)
    workdir = tmp_path_factory.mktemp("classify") / "run"
    finetune(cfg, workdir)
    return workdir, cfg


def held_out_file(cfg, directory: pathlib.Path) -> pathlib.Path:
    """The examples the run holds out for evaluation (finetune.eval_fraction), as JSONL."""
    _, held = records.split_eval(records.read_jsonl(cfg.finetune.train_file),
                                 cfg.finetune.eval_fraction, cfg.data.shuffle_seed)
    return write_jsonl(directory / "held_out.jsonl", [r.value for r in held])


def test_classify_reproduces_the_eval_accuracy(classifier, tmp_path, capsys):
    workdir, cfg = classifier
    assert cli.main(["eval", "--workdir", str(workdir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    held = held_out_file(cfg, tmp_path)
    result = run_fixture.jaxlm_cli("classify", "--workdir", workdir, "--jsonl", held, "--json",
                                   timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    predictions = out["predictions"]
    assert out["labels"] == LABELS and out["labelled"] == len(predictions) == evaluated["examples"]
    assert out["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-12)
    correct = sum(p["label"] == p["true_label"] for p in predictions)
    assert correct / len(predictions) == pytest.approx(evaluated["accuracy"], abs=1e-12)
    assert 0.25 < out["accuracy"]  # better than chance: the head and adapters were read
    for p in predictions:
        probs = p["probabilities"]
        assert list(probs) == LABELS and sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
        assert p["label"] == max(probs, key=probs.get)

    # Texts on the command line: one line each, the label by name and its probability, the
    # same as the JSONL run gave for those texts.
    texts = [p["text"] for p in predictions[:3]]
    assert cli.main(["classify", "--workdir", str(workdir)]
                    + [a for t in texts for a in ("--text", t)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line, p in zip(lines, predictions):
        label, prob = line.split()[:2]
        assert label == p["label"] and float(prob) == pytest.approx(
            p["probabilities"][label], abs=6e-4)
        assert json.dumps(p["text"]) in line


def test_bad_input_is_exit_2_naming_it(classifier, base_run, tmp_path, capsys):
    workdir, _ = classifier

    def run(*argv):
        code = cli.main(["classify", *[str(a) for a in argv]])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (code, err)
        return err

    assert "is not a classifier (a pretraining run)" in run("--workdir", base_run[0],
                                                            "--text", "x")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x = 1", "label": "assignment"},
                                               {"line": "import os"}])
    assert f"{bad}:2: the text field 'text'" in run("--workdir", workdir, "--jsonl", bad)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "x = 1", "label": "class"}])
    assert f"{unknown}:1: label 'class'" in run("--workdir", workdir, "--jsonl", unknown)
    assert "--text 2: the text is" in run("--workdir", workdir, "--text", "x = 1",
                                          "--text", "y" * 100)
    assert "no such file" in run("--workdir", workdir, "--jsonl", tmp_path / "none.jsonl")
