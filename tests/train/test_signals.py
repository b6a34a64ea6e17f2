"""A training command and its process: signals in the start-up and in the loop, and one
writer per workdir (real `jaxlm train` processes)."""

import json
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from jaxlm import errors

REPO = pathlib.Path(__file__).parents[2]
NOTHING_TO_SAVE = ("jaxlm: preempted ({}) during start-up, before the first step: nothing "
                   "to save; run the same command again to start")


def train_command(data_dir, workdir, steps, *extra):
    return [sys.executable, "-m", "jaxlm.cli", "train", "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            f"--config.train.steps={steps}", "--config.model.d_model=64",
            "--config.model.n_layers=2", "--config.model.d_ff=192", "--config.data.seq_len=64",
            "--config.data.global_batch_size=16", "--config.train.log_every=1",
            "--config.metrics.peak_flops=1e11", "--config.metrics.tensorboard=false", *extra]


def start(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_in_the_start_up_exits_75_with_nothing_to_save(stdlib_data_dir, tmp_path, sig):
    workdir = tmp_path / "run"
    proc = start(train_command(stdlib_data_dir, workdir, 5, "--config.model.n_layers=6"))
    for line in proc.stdout:  # the data is read: building and compiling come next
        if line.startswith("source stdlib:"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.PREEMPTED, err[-2000:]
    assert err.splitlines() == [NOTHING_TO_SAVE.format(sig.name)]
    # Nothing of a run was left behind: no lock, no checkpoint, no metrics.
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]
    assert not any((workdir / "checkpoints").iterdir())


def test_the_stop_takes_effect_at_the_next_step_boundary(stdlib_data_dir, tmp_path):
    """A save in flight at every step (checkpoint.every=1): the signal, sent right after a
    progress line, is announced naming the step in flight, and exactly that step is saved."""
    for trial, (sig, after) in enumerate([(signal.SIGTERM, 3), (signal.SIGINT, 5)]):
        workdir = tmp_path / f"run{trial}"
        proc = start(train_command(stdlib_data_dir, workdir, 500, "--config.checkpoint.every=1",
                                   "--config.checkpoint.keep=2"))
        for line in proc.stdout:
            if line.startswith(f"step {after}/500"):
                proc.send_signal(sig)
                break
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == errors.PREEMPTED, err[-2000:]
        announced = int(re.search(rf"jaxlm: {sig.name} received: finishing step (\d+), then "
                                  rf"saving it", err)[1])
        saved = int(re.search(r"jaxlm: preempted: checkpoint of step (\d+) saved", err)[1])
        assert saved == announced, err
        # The loop was past step `after` when the line was printed: the next boundary.
        assert after + 1 <= saved <= after + 2, err
        assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()) == saved


def test_two_runs_on_one_workdir_one_runs_the_other_stops_naming_it(stdlib_data_dir, tmp_path):
    workdir = tmp_path / "run"
    procs = [start(train_command(stdlib_data_dir, workdir, 30, "--config.checkpoint.every=10"))
             for _ in range(2)]
    results = [(p.pid, p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=300)]]
    codes = sorted(code for _, code, _, _ in results)
    assert codes == [errors.DONE, errors.BAD_INPUT], [r[3][-2000:] for r in results]
    winner = next(pid for pid, code, _, _ in results if code == errors.DONE)
    loser_err = next(err for _, code, _, err in results if code == errors.BAD_INPUT)
    assert re.fullmatch(rf"jaxlm: {re.escape(str(workdir))} is in use by another run \(host "
                        rf"\S+, pid {winner}, started [^)]+\); wait for it to end, or use another "
                        rf"--workdir\n", loser_err), loser_err
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert not (workdir / "lock.json").exists()
