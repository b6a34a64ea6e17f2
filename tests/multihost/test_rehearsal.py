"""The local pod rehearsal end to end: 2 processes x 4 simulated CPU devices (`jaxlm launch
local`, gloo collectives) against the single-process 8-device run of the same config.

Losses are compared within 1e-5 relative, not bit for bit: the two runs compute the same
global batch on the same (data 2, fsdp 2, tensor 2) mesh, but a reduction that crosses the
process boundary (the gradient and loss sums) runs over gloo, which adds the partial sums
in another order than XLA's in-process all-reduce; float32 addition is not associative, so
single values differ in the last bits (about 1e-7 relative observed).
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).parents[2]
STEPS = 24  # the reference run; the rehearsals compare against its first steps


def overrides(data_dir, steps, every):
    # wsd with a one-step decay: the learning rate of step s does not depend on
    # train.steps, so a run of k steps resumed to n steps follows the reference's rates.
    return [f"--config.data.data_dir={data_dir}", f"--config.train.steps={steps}",
            "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=192",
            "--config.data.seq_len=64", "--config.data.global_batch_size=16",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.optim.schedule=wsd", "--config.optim.decay_fraction=0.01",
            "--config.optim.warmup_steps=2", "--config.train.log_every=1",
            f"--config.checkpoint.every={every}", "--config.checkpoint.keep=10",
            "--config.metrics.peak_flops=1e11", "--config.metrics.tensorboard=false"]


def losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def assert_losses_match(workdir, reference, last_step):
    got = losses(workdir)
    assert sorted(got) == list(range(1, last_step + 1))
    steps = range(1, last_step + 1)
    np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)


@pytest.fixture(scope="module")
def reference(stdlib_data_dir, tmp_path_factory):
    """Per-step losses of the single-process run on this test process's 8 devices."""
    from jaxlm import config as config_lib
    from jaxlm.train import loop
    from jaxlm.train.lm import CausalLM

    cfg = config_lib.load(REPO / "configs" / "tiny.py", overrides(stdlib_data_dir, STEPS,
                                                                  every=1000))
    logged = loop.train(CausalLM(cfg), tmp_path_factory.mktemp("reference"))
    return {m["step"]: m["loss"] for m in logged}


def command(data_dir, workdir, steps, every, *extra):
    return [sys.executable, "-m", "jaxlm.cli", "launch", "local", "--processes", "2",
            "--devices-per-process", "4", "--", "train", "--config",
            str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
            *overrides(data_dir, steps, every), *extra]


LONGER = "--config.train.allow_config_change=true"  # resumed with more train.steps


def run(*args, **kwargs):
    done = subprocess.run(command(*args, **kwargs), capture_output=True, text=True, timeout=400)
    return done.returncode, done.stdout + done.stderr


def start(log_path, *args, **kwargs):
    """The launcher in the background, its output in `log_path`."""
    return subprocess.Popen(command(*args, **kwargs), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def wait_for_steps(proc, workdir, log_path, n, timeout=300):
    """Polls until process 0 logged `n` steps; returns the pid of process 1."""
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    return int(re.search(r"\[launch\] process 1: pid (\d+)", log_path.read_text())[1])


@pytest.mark.slow
def test_train_checkpoint_preempt_and_resume_like_one_process(reference, stdlib_data_dir,
                                                               tmp_path):
    """k steps with checkpoints; resumed towards n steps and preempted by SIGTERM to one
    process; resumed again to n. (One run through all three, to keep CI short.)"""
    workdir, log = tmp_path / "run", tmp_path / "launch.log"
    # ---- 4 steps, a checkpoint every 2 ----------------------------------------------
    code, out = run(stdlib_data_dir, workdir, steps=4, every=2)
    assert code == 0, out[-3000:]
    assert "Gloo" not in out and "peer ranks" not in out, out  # its notes held back
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    # Only process 0 prints progress and writes metrics; the checkpoint's data state has the
    # position of every row of the global batch (each process's rows merged).
    assert "[p0] step 4/4" in out and "[p1] step" not in out
    data = json.loads(next(p for p in (workdir / "checkpoints" / "4" / "data").iterdir()
                           if p.name != "commit_success.txt").read_text())
    assert data["rows"] == list(range(16)) and len(data["grain"]["streams"]) == 16
    assert_losses_match(workdir, reference, 4)

    # ---- resumed towards STEPS; a preemption notice to process 1 only -----------------
    proc = start(log, stdlib_data_dir, workdir, STEPS, 1000, LONGER)
    pid = wait_for_steps(proc, workdir, log, 7)
    # One lock for the run, held by process 0.
    p0 = int(re.search(r"\[launch\] process 0: pid (\d+)", log.read_text())[1])
    assert json.loads((workdir / "lock.json").read_text())["pid"] == p0
    os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    out = log.read_text()
    assert f"[p0] resumed from {workdir / 'checkpoints' / '4'}" in out
    saved = dict(re.findall(r"\[p(\d)\] jaxlm: preempted: checkpoint of step (\d+) saved", out))
    assert sorted(saved) == ["0", "1"] and saved["0"] == saved["1"], out[-3000:]
    step = int(saved["0"])
    assert 7 <= step < STEPS
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, step]
    assert "[launch] exit codes: p0=75, p1=75" in out

    # ---- resumed to STEPS: every loss as in the single-process run ---------------------
    code, out = run(stdlib_data_dir, workdir, STEPS, 1000, LONGER)
    assert code == 0, out[-3000:]
    assert f"[p0] resumed from {workdir / 'checkpoints' / str(step)}" in out
    assert_losses_match(workdir, reference, STEPS)


@pytest.mark.slow
def test_kill_9_of_one_process_stops_the_other_within_60_s(stdlib_data_dir, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "launch.log"
    proc = start(log, stdlib_data_dir, workdir, steps=100_000, every=100_000)
    pid = wait_for_steps(proc, workdir, log, 2)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code = proc.wait(timeout=120)
    elapsed = time.monotonic() - killed
    out = log.read_text()
    assert code == 128 + signal.SIGKILL, out[-3000:]  # the first failure: process 1's
    assert "[launch] process 1 exited with code -9 (killed by SIGKILL)" in out
    survivor = re.search(r"\[launch\] process 0 exited with code (-?\d+).*, ([\d.]+) s after "
                         r"process 1", out)
    assert survivor and int(survivor[1]) != 0 and float(survivor[2]) < 60, out[-3000:]
    assert "still running" not in out  # it stopped by itself, not by the launcher's backstop
    assert elapsed < 60
    # The survivor names the lost process: JAX's coordination service or jaxlm's own line.
    assert re.search(r"stopped sending heartbeats\):\n\[p0\] 1\n|lost process\(es\) \[1\]", out), \
        out[-3000:]
