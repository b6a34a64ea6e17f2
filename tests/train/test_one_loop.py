"""Every task runs through the one training loop, and gets its guarantees without code of its
own (the import contracts forbid jaxlm.finetune from importing the loop or the preemption
handler): a SIGTERM in the middle of any task's run finishes that step, saves it and stops
with exit code 75, and running again resumes to the uninterrupted run's losses, bit for bit.

The signal is sent by the process to itself when the loop has read step 3's batch, so the
preemption lands at the same step every time."""

import json
import os
import pathlib
import signal

import jax
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.train import loop, pretraining
from jaxlm.train.task import Task

TESTS = pathlib.Path(__file__).parents[1]
CONFIGS = TESTS.parent / "configs"
STEPS, PREEMPT_AT = 6, 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny pretraining run (random parameters at step 1) to fine-tune."""
    workdir = tmp_path_factory.mktemp("one_loop_base")
    run_fixture.write_run(workdir, run_fixture.tiny_run_config(str(workdir / "tfds")), seed=5)
    return workdir


@pytest.fixture(scope="module")
def t5_teacher_dir(tmp_path_factory):
    """A tiny T5 run (random parameters, 3 + 3 blocks) to teach the t5_tiny student."""
    workdir = tmp_path_factory.mktemp("one_loop_t5_teacher")
    cfg = config_lib.load_config_file(CONFIGS / "t5_tiny.py")
    cfg.model.update(d_model=32, n_layers=3, n_decoder_layers=3, n_heads=4, n_kv_heads=4,
                     head_dim=8, d_ff=64, max_seq_len=64)
    cfg.data.update(data_dir=str(workdir / "tfds"), seq_len=32, global_batch_size=8)
    run_fixture.write_run(workdir, config_lib.resolved(cfg, ByteTokenizer.vocab_size,
                                                       jax.device_count()), seed=6)
    return workdir


def task_config(name, data_dir, base, t5_teacher=None):
    """Each task's shipped config (tiny.py, bert_tiny.py, t5_tiny.py, lora_tiny.py,
    classify_tiny.py) cut to test size; distill: tiny.py taught by the base run; lora_tiny
    taught by it too (SFT distillation); t5_tiny by a T5 teacher (span corruption)."""
    if name in ("causal_lm", "distill", "bert_tiny", "t5_tiny"):
        cfg = config_lib.load_config_file(CONFIGS / (f"{name}.py" if "tiny" in name else
                                                     "tiny.py"))
        cfg.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                         max_seq_len=64)
        if name in ("causal_lm", "distill"):
            cfg.model.n_kv_heads = 2
        if name == "distill":
            cfg.distill.update(teacher=str(base), temperature=2.0)
        if name == "t5_tiny":
            cfg.model.update(n_decoder_layers=2, head_dim=8)
            cfg.distill.update(teacher=str(t5_teacher), temperature=2.0)
        cfg.data.update(data_dir=data_dir, seq_len=32, global_batch_size=8)
    else:
        cfg = config_lib.load_config_file(CONFIGS / f"{name}.py")
        cfg.finetune.update(base=str(base), overlong="skip")
        cfg.data.update(seq_len=64, global_batch_size=8)
        if name == "classify_tiny":
            cfg.finetune.method = "full"  # the shipped config is LoRA: cover both methods
        if name == "lora_tiny":  # SFT distillation: LoRA adapters taught by their own base
            cfg.distill.update(teacher=str(base), temperature=2.0)
    # Every task evaluates in the loop: at the start and after the last step.
    cfg.train.update(steps=STEPS, log_every=1, eval_every=STEPS, eval_batches=2)
    cfg.checkpoint.update(every=1000, keep=3)  # only the preemption and the last step save
    cfg.metrics.update(peak_flops=1e11, tensorboard=False)
    return cfg


def make_task(cfg, workdir) -> Task:
    return FinetuneTask(cfg, workdir) if cfg.finetune.task else pretraining.task(cfg)


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# Causal-LM pretraining runs here as distillation (CausalLM with a teacher); plain, its
# resume is tests/train/test_loop.py's and its SIGTERM exit tests/train/test_fault_tolerance.py's.
@pytest.mark.parametrize("name", ["distill", "bert_tiny", "t5_tiny", "lora_tiny",
                                  "classify_tiny"])
def test_every_task_is_preempted_and_resumes_exactly_in_the_one_loop(
        name, stdlib_data_dir, base_dir, t5_teacher_dir, tmp_path, monkeypatch):
    cfg = task_config(name, stdlib_data_dir, base_dir, t5_teacher_dir)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = loop.train(make_task(cfg, full_dir), full_dir)

    read = {"batches": 0}
    real = loop.batch_stats

    def preempting(batch, bos_id):  # the loop counts every training batch it reads
        read["batches"] += 1
        if read["batches"] == PREEMPT_AT:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice, during step 3
        return real(batch, bos_id)

    monkeypatch.setattr(loop, "batch_stats", preempting)
    with pytest.raises(errors.Preempted) as stopped:
        loop.train(make_task(cfg, cut_dir), cut_dir)
    assert stopped.value.step == PREEMPT_AT
    assert errors.exit_code(stopped.value) == errors.PREEMPTED == 75  # what the command exits
    assert sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == [str(PREEMPT_AT)]
    monkeypatch.undo()

    resumed = loop.train(make_task(cfg, cut_dir), cut_dir)
    train = [m for m in resumed if "loss" in m]
    assert all(("kd_loss" in m) == bool(cfg.distill.teacher) for m in train)
    assert [m["step"] for m in train] == list(range(PREEMPT_AT + 1, STEPS + 1))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [m[key] for m in train] == [m[key] for m in full if "loss" in m][PREEMPT_AT:], key
    # The evaluation after the last step, on the same state.
    final_eval = [m for m in resumed if "eval_loss" in m][-1]
    assert final_eval == [m for m in full if "eval_loss" in m][-1]
    # metrics.jsonl holds the preempted run's steps and the resumed ones, in order.
    steps = [m["step"] for m in metrics(cut_dir) if "loss" in m]
    assert steps == list(range(1, PREEMPT_AT + 1)) + list(range(PREEMPT_AT + 1, STEPS + 1))


def test_progress_line_is_the_same_for_every_task(stdlib_data_dir, base_dir, tmp_path, capsys):
    """One progress line for every task: step, loss (and accuracy when the task has it),
    tokens/s, MFU, learning rate (and epoch when the data has one), ETA."""
    import re
    for name in ("causal_lm", "classify_tiny"):
        cfg = task_config(name, stdlib_data_dir, base_dir)
        cfg.train.steps = 1
        loop.train(make_task(cfg, tmp_path / name), tmp_path / name)
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step 1/1"))
        acc = r"  acc [\d.]+" if name == "classify_tiny" else ""
        epoch = r"  epoch [\d.]+" if name == "classify_tiny" else ""
        evaluated = r"  eval [\d.]+"  # the evaluation at step 0
        assert re.fullmatch(rf"step 1/1  loss [\d.]+{acc}  tok/s [\d,]+  MFU [\d.]+%  "
                            rf"lr [\d.e+-]+{epoch}{evaluated}  ETA \d+:\d\d", line), line
