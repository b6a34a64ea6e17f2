"""launch/tpu_pod.py: slice shapes, every dry run's exact commands, the real path on fake
workers (install, start and log-streaming scripts run for real), one clear error per bad input."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import tempfile

import pytest
from launch_fakes import (
    REPO,
    TPU_ARGS,
    commands,
    fakes,  # noqa: F401 - a fixture
    ssh_command,
    tpu_pod,
    with_changes,
)

from jaxlm.launch import common as launchers

# ----------------------------------------------------------------------------- TPU shapes

@pytest.mark.parametrize("name, accelerator_type, chips, hosts, grid, gke_label", [
    ("v5p-128", "v5p-128", 64, 16, "4x4x4", "tpu-v5p-slice"),
    ("v5p-8", "v5p-8", 4, 1, "2x2x1", "tpu-v5p-slice"),
    ("v5p-16", "v5p-16", 8, 2, "2x2x2", "tpu-v5p-slice"),
    ("v4-32", "v4-32", 16, 4, "2x2x4", "tpu-v4-podslice"),
    ("v5litepod-16", "v5litepod-16", 16, 4, "4x4", "tpu-v5-lite-podslice"),
    ("v5e-8", "v5litepod-8", 8, 1, "2x4", "tpu-v5-lite-podslice"),
    ("v6e-256", "v6e-256", 256, 64, "16x16", "tpu-v6e-slice"),
])
def test_tpu_slice_shapes(name, accelerator_type, chips, hosts, grid, gke_label):
    tpu = launchers.tpu_slice(name, "--tpu")
    assert (tpu.accelerator_type, tpu.chips, tpu.hosts, tpu.gke_topology, tpu.gke_accelerator) \
        == (accelerator_type, chips, hosts, grid, gke_label)
    assert tpu.hosts * tpu.chips_per_host == chips


# ----------------------------------------------------------------------------- TPU pod

TRAIN = ("~/jaxlm-venv/bin/jaxlm train --config configs/llama3_8b.py "
         "--workdir gs://bucket/runs/llama --config.train.steps=1000")


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(fakes, capsys):
    assert tpu_pod.main([*TPU_ARGS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    cmds = commands(out)
    where = ["pod1", "--zone=us-east5-a", "--project=proj"]
    tarball = str(pathlib.Path(tempfile.gettempdir()) / "jaxlm-src-pod1.tar.gz")
    assert cmds[:3] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", *where,
         "--format=value(state,acceleratorType)"],
        ["gcloud", "compute", "tpus", "tpu-vm", "create", *where, "--accelerator-type=v5p-128",
         "--version=v2-alpha-tpuv5"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pod1:jaxlm-src.tar.gz",
         "--worker=all", "--zone=us-east5-a", "--project=proj", "--quiet"],
    ]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *where]
    assert [c[:10] for c in cmds[3:]] == [ssh + ["--worker=all", "--quiet"]] * 2 + \
        [ssh + ["--worker=0", "--quiet"]]
    install, start, stream = map(ssh_command, cmds[3:])
    assert "tar -xzf ~/jaxlm-src.tar.gz -C ~/jaxlm" in install
    assert '~/.local/bin/uv pip install --quiet --python ~/jaxlm-venv/bin/python -e ".[tpu]"' in install
    assert f"nohup bash -c {shlex.quote(TRAIN + '; echo $? > ~/jaxlm-run.exit')}" in start
    assert "tail -n +1 -F --pid=$(cat ~/jaxlm-run.pid) ~/jaxlm-run.log" in stream
    assert len(cmds) == 6
    assert "# v5p-128: 64 chips on 16 hosts; 16 jaxlm processes, 64 devices" in out
    assert fakes.calls() == []


def test_tpu_pod_queued_spot_dry_run(capsys):
    assert tpu_pod.main([*TPU_ARGS, "--queued", "--spot", "--runtime-version", "v2-alpha-tpuv5",
                         "--delete-when-done", "--dry-run"]) == 0
    cmds = commands(capsys.readouterr().out)
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    where = ["pod1", "--zone=us-east5-a", "--project=proj"]
    assert cmds[0] == [*qr, "describe", *where, "--format=value(state.state)"]
    assert cmds[1] == [*qr, "create", *where, "--node-id=pod1", "--accelerator-type=v5p-128",
                       "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert cmds[2] == cmds[0]  # polled until ACTIVE
    assert cmds[-1] == [*qr, "delete", *where, "--force", "--quiet"]


def test_tpu_pod_attach_and_delete_dry_run(capsys):
    assert tpu_pod.main(["--name", "pod1", "--zone", "z", "--attach", "--dry-run"]) == 0
    assert tpu_pod.main(["--name", "pod1", "--zone", "z", "--delete", "--dry-run"]) == 0
    attach, delete = commands(capsys.readouterr().out)
    assert attach[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=z",
                          "--worker=0"]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1", "--zone=z",
                      "--quiet"]


TINY_ARGS = ["--name", "pod1", "--zone", "z", "--accelerator-type", "v5litepod-16",
             "--config", "configs/tiny.py", "--workdir", "gs://bucket/run",
             "--config.train.steps=7"]


def test_tpu_pod_real_run_on_fake_workers(fakes, capfd):
    """Creates, copies this checkout, installs, starts on all 4 workers, streams worker 0:
    the same commands as the dry run, and the remote scripts work."""
    homes = fakes.workers(4)
    fakes.rules(("gcloud", ["tpu-vm", "describe"], [("", 1)]))  # no such TPU yet
    assert tpu_pod.main(TINY_ARGS) == 0
    out = capfd.readouterr().out
    assert tpu_pod.main([*TINY_ARGS, "--dry-run"]) == 0
    assert [c["argv"] for c in fakes.calls("gcloud")] == \
        [c[1:] for c in commands(capfd.readouterr().out)]
    assert "worker0: step 10 loss 3.21" in out and "worker1:" not in out
    for home in homes:
        cwd, *argv = (home / "train-args.txt").read_text().splitlines()
        assert cwd == str(home / "jaxlm")
        assert argv == ["train", "--config", "configs/tiny.py", "--workdir", "gs://bucket/run",
                        "--config.train.steps=7"]
        assert (home / "jaxlm/pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()
        assert (home / "jaxlm/launch/tpu_pod.py").is_file() and not (home / "jaxlm/.git").exists()
        assert (home / "uv.log").read_text().splitlines() == [
            f"venv --quiet --python 3.11 {home}/jaxlm-venv",
            f"pip install --quiet --python {home}/jaxlm-venv/bin/python -e .[tpu]"]
        assert (home / "jaxlm-run.exit").read_text().strip() == "0"


def test_tpu_pod_reuses_slice_clones_git_and_reports_preemption(fakes, capfd, tmp_path,
                                                                  monkeypatch):
    homes = fakes.workers(4)
    repo = tmp_path / "src"
    repo.mkdir()
    (repo / "pyproject.toml").write_text("[project]\nname = 'from-git'\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"], ["tag", "v1"]):
        subprocess.run(git + cmd, check=True)
    fakes.rules(("gcloud", ["tpu-vm", "describe"], [("READY\tv5litepod-16\n", 0)]))
    monkeypatch.setenv("FAKE_TRAIN_EXIT", "75")
    assert tpu_pod.main([*TINY_ARGS, "--git-url", str(repo), "--git-ref", "v1",
                         "--delete-when-done"]) == 75
    err = capfd.readouterr().err
    assert "preempted after saving a checkpoint (exit 75)" in err
    verbs = [c["argv"][3] for c in fakes.calls("gcloud")]
    assert verbs == ["describe", "ssh", "ssh", "ssh"]  # no create, no scp, no delete
    for home in homes:
        assert "from-git" in (home / "jaxlm/pyproject.toml").read_text()
        assert (home / "jaxlm-run.exit").read_text().strip() == "75"


def test_tpu_pod_leaves_a_running_run_alone(fakes, capfd):
    homes = fakes.workers(4)
    (homes[2] / "jaxlm-run.pid").write_text(str(os.getpid()))  # a live process on worker 2
    fakes.rules(("gcloud", ["tpu-vm", "describe"], [("READY\tv5litepod-16\n", 0)]))
    assert tpu_pod.main(TINY_ARGS) == 1
    assert f"a jaxlm run is still running (pid {os.getpid()}): use --attach" in capfd.readouterr().err
    assert [c["argv"][3] for c in fakes.calls("gcloud")] == ["describe", "scp", "ssh"]
    assert not (homes[2] / "jaxlm").exists() and not (homes[2] / "train-args.txt").exists()


def test_tpu_pod_refuses_a_slice_of_another_type(fakes, capfd):
    fakes.rules(("gcloud", ["tpu-vm", "describe"], [("READY\tv5litepod-32\n", 0)]))
    assert tpu_pod.main(TINY_ARGS) == 2
    assert "the existing TPU is a v5litepod-32, not a v5litepod-16" in capfd.readouterr().err
    assert len(fakes.calls()) == 1


def test_tpu_pod_queued_real_waits_until_active(fakes, capfd):
    fakes.workers(4)
    fakes.rules(("gcloud", ["queued-resources", "describe"],
                 [("", 1), ("WAITING_FOR_RESOURCES\n", 0), ("PROVISIONING\n", 0),
                  ("ACTIVE\n", 0)]))
    assert tpu_pod.main([*TINY_ARGS, "--queued", "--poll-seconds", "0",
                         "--delete-when-done"]) == 0
    verbs = [c["argv"][2:4] for c in fakes.calls("gcloud")]
    assert verbs == [["queued-resources", "describe"], ["queued-resources", "create"]] + \
        [["queued-resources", "describe"]] * 3 + [["tpu-vm", "scp"]] + [["tpu-vm", "ssh"]] * 3 + \
        [["queued-resources", "delete"]]
    assert "queued resource pod1: WAITING_FOR_RESOURCES" in capfd.readouterr().out


def test_tpu_pod_failed_queued_resource(fakes, capfd):
    fakes.rules(("gcloud", ["queued-resources", "describe"], [("FAILED\n", 0)]))
    assert tpu_pod.main([*TINY_ARGS, "--queued", "--poll-seconds", "0"]) == 2
    assert "queued resource pod1 is FAILED" in capfd.readouterr().err



@pytest.mark.parametrize("change, message", [
    ({"--accelerator-type": "v5p128"}, "--accelerator-type: 'v5p128' is not a TPU slice"),
    ({"--accelerator-type": "v5p-12"}, "v5p slices are v5p-8, -16, -32, -64 or whole"),
    ({"--accelerator-type": "v9-8"}, "unknown TPU generation 'v9'"),
    ({"--config": "configs/missing.py"}, "--config: config file not found: configs/missing.py"),
    ({"--workdir": "runs/x"}, "--workdir 'runs/x': 4 processes write each checkpoint"),
    ({"--config.train.stepz": "3"}, "unknown config key: config.train.stepz"),
    ({"--config.mesh.tensor": "3"}, "configs/tiny.py on 16 devices: config.mesh"),
    ({"--name": "Pod_1"}, "--name 'Pod_1': use lowercase letters"),
])
def test_tpu_pod_bad_input_fails_before_any_command(fakes, capfd, change, message):
    assert tpu_pod.main(with_changes(TINY_ARGS, change)) == 2
    err = capfd.readouterr().err
    assert err.startswith("tpu_pod: ") and message in err and len(err.splitlines()) == 1
    assert fakes.calls() == []
