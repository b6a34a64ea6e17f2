"""The encoder tasks get the one loop's guarantees without code of their own: a SIGTERM during
step 3 of a QA run (full fine-tuning of a bert) or of a text-to-text run (LoRA on a t5)
saves that step and stops with exit code 75; running again resumes to the uninterrupted
run's losses and final evaluation, bit for bit (the pattern of tests/train/test_one_loop.py).
"""

import json
import os
import signal

import pytest
from encoder_runs import base_config, word_tokenizer, write_base

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.finetune.examples import data_path
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.train import loop

STEPS, PREEMPT_AT = 6, 3
CASES = {"qa": ("bert", "qa_tiny", ("question", "context"), "full"),
         "seq2seq": ("t5", "translate_tiny", ("input", "target"), "lora")}


def base_and_config(tmp_path, task):
    family, data, fields, method = CASES[task]
    train_file, eval_file = data_path(f"{data}_train.jsonl"), data_path(f"{data}_eval.jsonl")
    texts = []
    for name in (train_file, eval_file):
        with open(name) as f:
            texts += [json.loads(line)[k] for line in f for k in fields]
    tok_path = tmp_path / "tok" / "tokenizer.json"
    tok = word_tokenizer(tok_path, texts, "bert" if family == "bert" else "t5")
    write_base(tmp_path / "base", base_config(family, tok, str(tok_path)), tok, seed=1)
    cfg = config_lib.defaults()
    cfg.finetune.update(task=task, method=method, base=str(tmp_path / "base"),
                        train_file=train_file, eval_file=eval_file)
    cfg.finetune.lora.update(rank=4, alpha=8.0, dropout=0.1, targets="q,v")
    cfg.data.update(seq_len=32 if task == "seq2seq" else 64, global_batch_size=8)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=1)
    cfg.train.update(steps=STEPS, log_every=1, eval_every=STEPS)
    cfg.checkpoint.update(every=1000, keep=3)  # only the preemption and the last step save
    cfg.metrics.update(peak_flops=1e11, tensorboard=False)
    return cfg


@pytest.mark.parametrize("task", sorted(CASES))
def test_preempted_and_resumed_exactly(task, tmp_path, monkeypatch):
    cfg = base_and_config(tmp_path, task)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = loop.train(FinetuneTask(cfg, full_dir), full_dir)

    read = {"batches": 0}
    real = loop.batch_stats

    def preempting(batch, bos_id):  # the loop counts every training batch it reads
        read["batches"] += 1
        if read["batches"] == PREEMPT_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, bos_id)

    monkeypatch.setattr(loop, "batch_stats", preempting)
    with pytest.raises(errors.Preempted) as stopped:
        loop.train(FinetuneTask(cfg, cut_dir), cut_dir)
    assert stopped.value.step == PREEMPT_AT and errors.exit_code(stopped.value) == 75
    assert sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == [str(PREEMPT_AT)]
    monkeypatch.undo()

    resumed = loop.train(FinetuneTask(cfg, cut_dir), cut_dir)
    train = [m for m in resumed if "loss" in m]
    assert [m["step"] for m in train] == list(range(PREEMPT_AT + 1, STEPS + 1))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [m[key] for m in train] == [m[key] for m in full if "loss" in m][PREEMPT_AT:], key
    final = [m for m in resumed if "eval_loss" in m][-1]
    assert final == [m for m in full if "eval_loss" in m][-1]
    assert "eval_exact_match" in final
    assert len({m["loss"] for m in train}) == len(train)  # the steps really train


def test_lora_targets_the_family_lacks_are_one_config_error(tmp_path):
    cfg = base_and_config(tmp_path, "seq2seq")
    cfg.finetune.lora.targets = "q,mlp"  # t5's adapters go on its attention projections only
    with pytest.raises(config_lib.ConfigError, match=r"config\.finetune\.lora\.targets: family "
                                                     r"'t5' has no mlp projections"):
        FinetuneTask(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
