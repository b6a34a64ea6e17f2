"""Helpers shared by the fine-tuning tests (a unique module name: several test directories
have a conftest.py, so tests import these from here, not from conftest)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random

TESTS = pathlib.Path(__file__).parents[1]


def load_test_module(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORDS = ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta")


def sft_lines(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        w = rng.choice(WORDS)
        if i % 2:
            out.append({"prompt": f"up {w}", "response": w.upper()})
        else:
            out.append({"messages": [{"role": "user", "content": f"up {w}"},
                                     {"role": "assistant", "content": w.upper()}]})
    return out


def write_jsonl(path: pathlib.Path, lines: list) -> pathlib.Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def finetune(cfg, workdir):
    """What `jaxlm finetune` runs: the config's fine-tuning task through the training loop.
    Returns the logged metrics."""
    from jaxlm.finetune.tasks import FinetuneTask
    from jaxlm.train import loop
    return loop.train(FinetuneTask(cfg, workdir), workdir)
