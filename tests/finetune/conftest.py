"""Shared fixtures of the fine-tuning tests: a tiny base run (written as `jaxlm train`
leaves one), small JSONL files, and a config factory."""

from __future__ import annotations

import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from ft_helpers import finetune, sft_lines, write_jsonl


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """A tiny llama run directory (d_model 32, 2 layers, GQA 4/2, max_seq_len 64, byte
    tokenizer) with random parameters at step 1. Returns (workdir, params, model config)."""
    workdir = tmp_path_factory.mktemp("base")
    cfg = run_fixture.tiny_run_config(str(workdir / "unused_tfds"))
    params = run_fixture.write_run(workdir, cfg, seed=3)
    return workdir, params, cfg.model


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", sft_lines(72))


@pytest.fixture(scope="session")
def make_cfg(base_run):
    """make_cfg(task, method, train_file, **sections) -> a fine-tuning config on the base."""
    from jaxlm import config as config_lib

    def make(task: str, method: str, train_file, steps: int = 6, every: int = 3, **sections):
        cfg = config_lib.defaults()
        cfg.finetune.update(task=task, method=method, base=str(base_run[0]),
                            train_file=str(train_file))
        cfg.finetune.lora.update(rank=4, alpha=8.0)
        cfg.model.update(remat="none")
        cfg.data.update(seq_len=64, global_batch_size=8)
        cfg.optim.update(learning_rate=1e-2, warmup_steps=1)
        cfg.train.update(steps=steps, log_every=1, eval_every=steps)  # at the start and end
        cfg.checkpoint.update(every=every, keep=5)
        cfg.metrics.update(tensorboard=False)
        for section, values in sections.items():
            if isinstance(values, dict) and section == "lora":
                cfg.finetune.lora.update(values)
            else:
                cfg[section].update(values)
        return cfg

    return make


@pytest.fixture(scope="session")
def lora_run(make_cfg, sft_file, tmp_path_factory):
    """6 LoRA steps of SFT with adapter dropout, checkpoints at 3 and 6 (shared by the
    training tests and those that generate, evaluate and score from a LoRA run). Returns
    (workdir, logged metrics, config). Tests copy it before changing anything in it."""
    cfg = make_cfg("sft", "lora", sft_file, steps=6, every=3, lora={"dropout": 0.1})
    workdir = tmp_path_factory.mktemp("lora")
    return workdir, finetune(cfg, workdir), cfg
