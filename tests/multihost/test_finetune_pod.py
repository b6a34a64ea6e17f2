"""Fine-tuning and evaluation run multi-host like pretraining: a LoRA SFT task and
`jaxlm eval` on a 2-process local pod (2 x 4 simulated CPU devices, gloo) give what one
process with 8 devices gives.

As in test_rehearsal.py, figures are compared within 1e-5 relative: sums that cross the
process boundary run over gloo, in another order than XLA's in-process reductions."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm import config as config_lib
from jaxlm.cli import tasks
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.infer import evaluate
from jaxlm.train import loop

REPO = pathlib.Path(__file__).parents[2]
STEPS = 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny pretraining run (random parameters at step 1) to fine-tune."""
    workdir = tmp_path_factory.mktemp("pod_base")
    run_fixture.write_run(workdir, run_fixture.tiny_run_config(str(workdir / "tfds")), seed=7)
    return workdir


def overrides(base):
    """configs/lora_tiny.py (adapters with dropout) cut to test size."""
    return [f"--config.finetune.base={base}", "--config.finetune.overlong=skip",
            f"--config.train.eval_every={STEPS}", "--config.data.seq_len=64",
            "--config.data.global_batch_size=8", f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", "--config.checkpoint.every=2",
            "--config.metrics.peak_flops=1e11", "--config.metrics.tensorboard=false"]


def on_two_processes(*command) -> str:
    """`jaxlm launch local --processes 2 --devices-per-process 4 -- <command>`; its output."""
    done = subprocess.run([sys.executable, "-m", "jaxlm.cli", "launch", "local", "--processes",
                           "2", "--devices-per-process", "4", "--", *map(str, command)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def train_records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_lora_sft_and_eval_on_two_processes_equal_one_process(base_dir, tmp_path):
    config_file = REPO / "configs" / "lora_tiny.py"
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = config_lib.load(config_file, overrides(base_dir))
    logged = loop.train(FinetuneTask(cfg, one), one)  # this process: 8 devices

    out = on_two_processes("finetune", "--config", config_file, "--workdir", two,
                           *overrides(base_dir))
    assert f"[p0] step {STEPS}/{STEPS}" in out and "[p1] step" not in out
    assert [r["step"] for r in train_records(two)] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in train_records(two)],
                                   [r[key] for r in logged if "loss" in r], rtol=1e-5)
    # Data figures count every process's rows: the same as one process reading them all.
    assert [r["data_tokens"] for r in train_records(two)] == \
        [r["data_tokens"] for r in logged if "loss" in r]
    final_eval = [r for r in logged if "eval_loss" in r][-1]
    two_eval = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()
                if "eval_loss" in line][-1]
    np.testing.assert_allclose(two_eval["eval_loss"], final_eval["eval_loss"], rtol=1e-5)
    # The goodput account gathers both processes': the mean, the lowest goodput and the
    # longest data wait (one process has none of the last two).
    account = json.loads((two / "goodput.jsonl").read_text())
    assert account["goodput_min"] <= account["goodput"]
    assert account["time_data_max_s"] >= account["time_data_s"]
    assert "goodput_min" not in json.loads((one / "goodput.jsonl").read_text())

    # `jaxlm eval` of the 2-process run, on 2 processes and in this one process.
    printed = [line for line in on_two_processes("eval", "--workdir", two, "--json").splitlines()
               if line.startswith("[p0] {")]
    assert len(printed) == 1  # process 0 prints
    pod = json.loads(printed[0][len("[p0] "):])
    here = evaluate.evaluate(tasks.for_run(two), two)
    assert pod["tokens"] == here["tokens"] > 0 and pod["batches"] == here["batches"]
    np.testing.assert_allclose(pod["loss"], here["loss"], rtol=1e-5)
    np.testing.assert_allclose(pod["loss"], final_eval["eval_loss"], rtol=1e-5)
