"""`jaxlm finetune` and `jaxlm lora merge` on bad input: exit status 2 and one message that
names the file:line, key or checkpoint, before anything is compiled."""

from __future__ import annotations

import pathlib

from ft_helpers import write_jsonl

from jaxlm import cli

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_malformed_jsonl_line_is_named(base_run, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "{not json"])
    code, err = run(capsys, "finetune", "--config", CONFIGS / "sft_tiny.py", "--workdir",
                    tmp_path / "run", f"--config.finetune.base={base_run[0]}",
                    f"--config.finetune.train_file={bad}", "--config.data.seq_len=64")
    assert code == 2 and f"{bad}:2: not valid JSON" in err, err


def test_missing_label_is_named(base_run, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "c.jsonl", [{"text": "import os", "label": "import"},
                                             {"text": "x = 1"}])
    code, err = run(capsys, "finetune", "--config", CONFIGS / "classify_tiny.py", "--workdir",
                    tmp_path / "run", f"--config.finetune.base={base_run[0]}",
                    f"--config.finetune.train_file={bad}", f"--config.finetune.eval_file={bad}")
    assert code == 2 and f"{bad}:2: missing label 'label'" in err, err


def test_missing_base_and_bad_keys(tmp_path, capsys):
    code, err = run(capsys, "finetune", "--config", CONFIGS / "lora_tiny.py", "--workdir",
                    tmp_path / "run", f"--config.finetune.base={tmp_path / 'nowhere'}")
    assert code == 2 and "nowhere" in err, err
    code, err = run(capsys, "finetune", "--config", CONFIGS / "lora_tiny.py",
                    "--config.finetune.lora.targets=q,up")
    assert code == 2 and "config.finetune.lora.targets" in err, err


def test_finetune_configs_are_not_pretraining_configs(capsys):
    code, err = run(capsys, "train", "--config", CONFIGS / "sft_tiny.py")
    assert code == 2 and "jaxlm finetune" in err, err


def test_merge_refuses_a_run_without_adapters(base_run, tmp_path, capsys):
    code, err = run(capsys, "lora", "merge", base_run[0], "--out", tmp_path / "out")
    assert code == 2 and "not a LoRA run" in err, err
