"""Preemption, non-finite losses and resuming on another mesh, end to end."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.model import zoo
from jaxlm.train import lm, loop
from jaxlm.train import step as step_lib
from jaxlm.train.lm import CausalLM
from jaxlm.train.task import Task

REPO = pathlib.Path(__file__).parents[2]


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, pathlib.Path(path).read_text().splitlines())}


# ---- non-finite losses ---------------------------------------------------------------

def _state_and_batch():
    m = config_lib.defaults().model
    m.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=384, remat="none")
    graphdef, params = nnx.split(zoo.create(m))
    params = nnx.to_pure_dict(params)
    tx = optax.adam(1e-2)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init({"params": params}), "nonfinite_steps": jnp.zeros((), jnp.int32)}
    tokens = np.arange(2 * 9, dtype=np.int32).reshape(2, 9) % 300 + 3
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.ones((2, 8), np.int32), "positions": np.tile(np.arange(8), (2, 1)),
             "weights": np.ones((2, 8), np.float32)}
    batch["weights"][0, 3] = np.nan  # poisons the loss and every gradient
    optim = config_lib.defaults().optim
    objective = step_lib.Objective(
        lambda trainable, frozen, b, key, train: lm.loss_sums(graphdef, trainable["params"], b,
                                                              0.0), lm.token_metrics)
    return optim, tx, objective, state, batch


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_step_keeps_the_last_good_state(policy):
    optim, tx, objective, state, batch = _state_and_batch()
    before = jax.device_get(state)
    step = jax.jit(step_lib.make_train_step(objective, ("params",), optim, tx,
                                            optax.constant_schedule(1e-2), nonfinite=policy))
    after, metrics = step(state, {}, batch)
    assert not np.isfinite(metrics["loss"])
    assert int(after["step"]) == 1 and int(after["nonfinite_steps"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after["params"]), before["params"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after["opt_state"]), before["opt_state"])


def test_nonfinite_step_under_continue_applies_the_update():
    optim, tx, objective, state, batch = _state_and_batch()
    step = jax.jit(step_lib.make_train_step(objective, ("params",), optim, tx,
                                            optax.constant_schedule(1e-2), nonfinite="continue"))
    after, _ = step(state, {}, batch)
    assert int(after["nonfinite_steps"]) == 1
    assert not np.isfinite(np.asarray(after["params"]["embed"])).all()


def test_stop_policy_stops_before_saving_a_poisoned_state(run_config, tmp_path, monkeypatch):
    real = Task.to_global
    calls = {"n": 0}

    def poisoned(task, local):
        calls["n"] += 1
        if calls["n"] == 3:  # the batch of step 3
            local = dict(local, weights=np.full_like(local["weights"], np.nan))
        return real(task, local)

    monkeypatch.setattr(Task, "to_global", poisoned)
    cfg = run_config(steps=6, every=2, seq_len=64, warmup_steps=2)
    cfg.train.log_every = 2
    with pytest.raises(loop.NonFiniteLoss, match=r"1 step\(s\) in \(2, 4\].*Last good checkpoint: 2"):
        loop.train(CausalLM(cfg), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


# ---- preemption ----------------------------------------------------------------------

def cli_args(data_dir, workdir, steps, every):
    return [sys.executable, "-m", "jaxlm.cli", "train", "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={steps}", "--config.model.d_model=64", "--config.model.n_layers=2",
            "--config.model.d_ff=192", "--config.data.seq_len=64", "--config.data.global_batch_size=16",
            "--config.train.log_every=1", f"--config.checkpoint.every={every}",
            "--config.metrics.peak_flops=1e11", "--config.metrics.tensorboard=false"]


@pytest.mark.slow
def test_sigterm_saves_exits_with_code_and_resumes_exactly(stdlib_data_dir, tmp_path):
    steps = 40
    reference = tmp_path / "reference"
    done = subprocess.run(cli_args(stdlib_data_dir, reference, steps, every=1000),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(cli_args(stdlib_data_dir, workdir, steps, every=1000),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == errors.PREEMPTED, stderr[-2000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 5 <= saved[0] < steps
    assert f"checkpoint of step {saved[0]} saved" in stderr

    resumed = subprocess.run(cli_args(stdlib_data_dir, workdir, steps, every=1000),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {workdir / 'checkpoints' / str(saved[0])}" in resumed.stdout
    got, want = losses(metrics), losses(reference / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == [want[s] for s in range(1, steps + 1)]  # bit for bit


# ---- resharding ----------------------------------------------------------------------

def test_resume_on_a_different_mesh(run_config, tmp_path):
    full = tmp_path / "full"
    cfg = run_config(steps=4, every=2, seq_len=64, warmup_steps=2)
    cfg.mesh.update(data=1, fsdp=8, tensor=1)
    reference = {m["step"]: m["loss"] for m in loop.train(CausalLM(cfg), full)}

    moved = tmp_path / "moved"
    shutil.copytree(full, moved)
    shutil.rmtree(moved / "checkpoints" / "4")
    cfg.mesh.update(data=2, fsdp=2, tensor=2)  # restore reshards onto this mesh
    resumed = {m["step"]: m["loss"] for m in loop.train(CausalLM(cfg), moved)}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-5)
