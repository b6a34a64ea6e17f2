"""Launchers (launch/tpu_pod.py, launch/gke/render.py, launch/slurm.py): every dry run's
exact commands and manifest, one clear error per bad input with nothing run, and the real
path against fake gcloud / kubectl / xpk / sbatch / srun executables on PATH that record
their arguments. The fake gcloud runs `tpu-vm ssh` commands in directories standing for the
TPU workers' homes, so the remote install, start and log-streaming scripts run for real."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import textwrap

import pytest
import yaml

from jaxlm import launchers

REPO = launchers.REPO_ROOT


def load(relpath: str):
    spec = importlib.util.spec_from_file_location(
        "launch_" + relpath.replace("/", "_").removesuffix(".py"), REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_pod = load("launch/tpu_pod.py")
gke = load("launch/gke/render.py")
slurm = load("launch/slurm.py")

# Records every call (program, argv, stdin) and answers from rules.json: the first rule whose
# program matches and whose words all appear in argv gives the next of its (stdout, code)
# answers (the last one repeats). Unanswered `gcloud compute tpus tpu-vm scp/ssh` act on the
# worker homes state/worker*: scp copies the local file into each, ssh runs --command with
# bash in each (HOME = that directory) and exits with the largest exit code.
FAKE_CLI = textwrap.dedent("""\
    import json, os, pathlib, shutil, subprocess, sys
    prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
    state = pathlib.Path(os.environ["FAKE_STATE"])
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    with open(state / "calls.jsonl", "a") as f:
        f.write(json.dumps({"prog": prog, "argv": argv, "stdin": stdin}) + "\\n")
    rules = state / "rules.json"
    for i, rule in enumerate(json.loads(rules.read_text()) if rules.exists() else []):
        if rule["prog"] == prog and all(w in argv for w in rule["words"]):
            counter = state / f"rule{i}.count"
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            out, code = rule["answers"][min(n, len(rule["answers"]) - 1)]
            sys.stdout.write(out)
            sys.exit(code)
    homes = sorted(state.glob("worker*"))
    flag = lambda name: next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))
    if prog == "gcloud" and argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        for home in homes:
            shutil.copy(argv[4], home / argv[5].split(":", 1)[1])
    if prog == "gcloud" and argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        worker = flag("--worker")
        chosen = homes if worker == "all" else [state / f"worker{worker}"]
        codes = [subprocess.run(["bash", "-c", flag("--command")],
                                env=dict(os.environ, HOME=str(home))).returncode
                 for home in chosen]
        sys.exit(max(codes))
    if prog == "sbatch":
        print("Submitted batch job 4242")
""")
# On each fake worker: uv (venv makes bin/python; pip install puts the jaxlm entry point in
# the venv) and that entry point, which records its directory and arguments and prints a
# progress line naming the worker.
FAKE_UV = textwrap.dedent("""\
    #!/bin/bash
    echo "$*" >> "$HOME/uv.log"
    if [ "$1" = venv ]; then mkdir -p "${@: -1}/bin" && ln -s "$(command -v python3)" "${@: -1}/bin/python"; fi
    if [ "$1" = pip ]; then cp "$HOME/../fake_jaxlm" "$HOME/jaxlm-venv/bin/jaxlm"; fi
""")
FAKE_JAXLM = textwrap.dedent("""\
    #!/bin/bash
    printf '%s\\n' "$PWD" "$@" > "$HOME/train-args.txt"
    echo "$(basename "$HOME"): step 10 loss 3.21"
    exit "${FAKE_TRAIN_EXIT:-0}"
""")


class Fakes:
    def __init__(self, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
        self.state = root / "state"
        self.bin = root / "bin"
        self.state.mkdir()
        self.bin.mkdir()
        for prog in ("gcloud", "kubectl", "xpk", "sbatch", "srun", "scontrol"):
            path = self.bin / prog
            path.write_text(f"#!{sys.executable}\n{FAKE_CLI}")
            path.chmod(0o755)
        monkeypatch.setenv("FAKE_STATE", str(self.state))
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")

    def rules(self, *rules: tuple[str, list[str], list[tuple[str, int]]]) -> None:
        (self.state / "rules.json").write_text(json.dumps(
            [{"prog": p, "words": w, "answers": a} for p, w, a in rules]))

    def workers(self, count: int) -> list[pathlib.Path]:
        (self.state / "fake_jaxlm").write_text(FAKE_JAXLM)
        (self.state / "fake_jaxlm").chmod(0o755)
        homes = []
        for i in range(count):
            home = self.state / f"worker{i}"
            (home / ".local/bin").mkdir(parents=True)
            (home / ".local/bin/uv").write_text(FAKE_UV)
            (home / ".local/bin/uv").chmod(0o755)
            homes.append(home)
        return homes

    def calls(self, prog: str | None = None) -> list[dict]:
        path = self.state / "calls.jsonl"
        calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [c for c in calls if prog is None or c["prog"] == prog]


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    return Fakes(tmp_path, monkeypatch)


def commands(output: str) -> list[list[str]]:
    """The commands of a dry run: its lines that are not comments, split as the shell does."""
    return [shlex.split(line) for line in output.splitlines() if line and not line.startswith("#")]


def ssh_command(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))


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

TPU_ARGS = ["--name", "pod1", "--zone", "us-east5-a", "--project", "proj",
            "--accelerator-type", "v5p-128", "--config", "configs/llama3_8b.py",
            "--workdir", "gs://bucket/runs/llama", "--config.train.steps=1000"]
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


def with_changes(argv: list[str], change: dict[str, str]) -> list[str]:
    """`argv` with each flag's value replaced (or the flag added); --config.x keys become
    --config.x=value overrides."""
    argv = list(argv)
    for flag, value in change.items():
        if flag.startswith("--config."):
            argv.append(f"{flag}={value}")
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


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


# ----------------------------------------------------------------------------- GKE

GKE_TPU = ["tpu", "--name", "llama8b", "--image", "us-docker.pkg.dev/p/r/jaxlm:v1",
           "--tpu", "v5p-128", "--hosts", "16", "--config", "configs/llama3_8b.py",
           "--workdir", "gs://bucket/runs/llama", "--config.train.steps=1000"]
GKE_GPU = ["gpu", "--name", "llama1b", "--image", "us-docker.pkg.dev/p/r/jaxlm-gpu:v1",
           "--hosts", "4", "--gpus-per-host", "8", "--config", "configs/llama_1b.py",
           "--workdir", "gs://bucket/runs/llama1b"]


def heredoc_manifest(output: str) -> tuple[str, str]:
    """(the command line before the heredoc, the manifest inside it)."""
    head, rest = output.split(" <<'EOF'\n", 1)
    return head.splitlines()[-1], rest.split("\nEOF\n", 1)[0] + "\n"


def container_argv(command: str, tmp_path: pathlib.Path, index: int) -> list[str]:
    """What the pod's `bash -c COMMAND` executes, with JOB_COMPLETION_INDEX=index and a
    `jaxlm` on PATH that prints its arguments."""
    fake = tmp_path / "podbin" / "jaxlm"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}",
               JOB_COMPLETION_INDEX=str(index))
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.splitlines()


def test_gke_tpu_dry_run_manifest(fakes, capsys, tmp_path):
    assert gke.main([*GKE_TPU, "--cluster", "c1", "--project", "p", "--zone", "z",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    command, text = heredoc_manifest(out)
    assert command == "kubectl apply -f -"
    manifest = yaml.safe_load(text)
    assert (manifest["apiVersion"], manifest["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert manifest["metadata"]["name"] == "llama8b"
    assert manifest["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    assert manifest["spec"]["failurePolicy"] == {"maxRestarts": 3}
    [job] = manifest["spec"]["replicatedJobs"]
    assert (job["name"], job["replicas"]) == ("slice", 1)
    assert (job["template"]["spec"]["parallelism"], job["template"]["spec"]["completions"],
            job["template"]["spec"]["backoffLimit"]) == (16, 16, 0)
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "4x4x4"}
    assert (pod["hostNetwork"], pod["restartPolicy"]) == (True, "Never")
    [container] = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/r/jaxlm:v1"
    assert container["resources"] == {"limits": {"google.com/tpu": 4}}
    assert container["command"] == ["bash", "-c"]
    argv = container_argv(container["args"][0], tmp_path, index=5)
    assert argv == [
        "train", "--config", "configs/llama3_8b.py", "--workdir", "gs://bucket/runs/llama",
        "--coordinator", "llama8b-slice-0-0.llama8b:8476", "--num-processes", "16",
        "--process-id", "5", "--config.train.steps=1000"]
    # jaxlm's own parser takes them, and jaxlm.distributed starts process 5 of 16 from them.
    from jaxlm import cli, distributed
    parsed = cli.build_parser().parse_args(cli.split_overrides(argv)[0])
    plan = distributed.detect(parsed.coordinator, parsed.num_processes, parsed.process_id,
                              env={}, tpu_vm=True)
    assert (plan.kind, plan.coordinator, plan.num_processes, plan.process_id) == \
        ("explicit", "llama8b-slice-0-0.llama8b:8476", 16, 5)
    xpk = next(line for line in out.splitlines() if line.startswith("# xpk "))
    assert shlex.split(xpk[2:]) == [
        "xpk", "workload", "create", "--cluster=c1", "--workload=llama8b",
        "--docker-image=us-docker.pkg.dev/p/r/jaxlm:v1", "--tpu-type=v5p-128",
        "--num-slices=1", "--max-restarts=3", "--restart-on-user-code-failure",
        "--project=p", "--zone=z",
        "--command=cd /jaxlm && jaxlm train --config configs/llama3_8b.py "
        "--workdir gs://bucket/runs/llama --config.train.steps=1000"]
    assert fakes.calls() == []


def test_gke_gpu_dry_run_manifest(capsys, tmp_path):
    assert gke.main([*GKE_GPU, "--dry-run"]) == 0
    manifest = yaml.safe_load(heredoc_manifest(capsys.readouterr().out)[1])
    [job] = manifest["spec"]["replicatedJobs"]
    assert job["name"] == "node" and job["template"]["spec"]["parallelism"] == 4
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    [container] = pod["containers"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    assert container_argv(container["args"][0], tmp_path, index=3) == [
        "train", "--config", "configs/llama_1b.py", "--workdir", "gs://bucket/runs/llama1b",
        "--coordinator", "llama1b-node-0-0.llama1b:8476", "--num-processes", "4",
        "--process-id", "3"]


def test_gke_real_mode_applies_the_dry_run_manifest(fakes, capsys):
    assert gke.main([*GKE_GPU, "--dry-run"]) == 0
    _, manifest = heredoc_manifest(capsys.readouterr().out)
    assert gke.main(GKE_GPU) == 0
    assert gke.main(["gpu", "--name", "llama1b", "--namespace", "ml", "--delete"]) == 0
    assert [(c["argv"], c["stdin"]) for c in fakes.calls()] == [
        (["apply", "-f", "-"], manifest),
        (["delete", "jobset", "llama1b", "--namespace=ml"], "")]


def test_gke_xpk_real_mode(fakes, capsys):
    args = [*GKE_TPU, "--xpk", "--cluster", "c1", "--num-slices", "2"]
    assert gke.main([*args, "--dry-run"]) == 0
    [expected] = commands(capsys.readouterr().out)
    assert "--num-slices=2" in expected
    assert gke.main(args) == 0
    assert [c["argv"] for c in fakes.calls("xpk")] == [expected[1:]]


@pytest.mark.parametrize("args, message", [
    ([*GKE_TPU[:8], "8", *GKE_TPU[9:]],
     "--hosts 8 does not match --tpu v5p-128 (topology 4x4x4): 64 chips at 4 per host are 16 hosts"),
    ([*GKE_TPU, "--topology", "4x4x8"], "--topology '4x4x8' has 128 chips but --tpu v5p-128 has 64"),
    ([*GKE_TPU, "--topology", "8x8"], "v5p slices are 3-D chip grids"),
    ([*GKE_TPU[:6], "v5p-100", *GKE_TPU[7:]], "--tpu: 'v5p-100'"),
    ([*GKE_TPU, "--num-slices", "2"], "--num-slices 2: several slices"),
    ([*GKE_GPU[:5], *GKE_GPU[7:]], "--hosts: the number of GPU nodes"),
    ([*GKE_GPU, "--gpus-per-host", "0"], "--gpus-per-host 0: must be 1 to 16"),
    ([*GKE_GPU[:-1], "/shared/runs"], "--workdir '/shared/runs': 4 processes"),
    ([*GKE_GPU, "--config.model.n_heads=5"], "configs/llama_1b.py on 32 devices: config.model"),
    ([*GKE_TPU[:4], "bad image", *GKE_TPU[5:]], "--image 'bad image'"),
])
def test_gke_bad_input_fails_before_any_command(fakes, capfd, args, message):
    assert gke.main(args) == 2
    err = capfd.readouterr().err
    assert err.startswith("gke: ") and message in err and len(err.splitlines()) == 1
    assert fakes.calls() == []


# ----------------------------------------------------------------------------- SLURM

SLURM_ARGS = ["--nodes", "4", "--gpus-per-node", "8", "--config", "configs/llama_1b.py",
              "--workdir", "/shared/runs/llama1b", "--partition", "gpu", "--time", "24:00:00",
              "--requeue", "--python", "/shared/venv/bin/python", "--config.train.steps=1000"]
SBATCH = ["sbatch", "--job-name=jaxlm", "--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1",
          "--partition=gpu", "--time=24:00:00", "--requeue",
          "--export=ALL,JAXLM_PYTHON=/shared/venv/bin/python,JAXLM_REQUEUE=1"]
JAXLM_ARGS = ["--config", "configs/llama_1b.py", "--workdir", "/shared/runs/llama1b",
              "--config.train.steps=1000"]


def test_slurm_dry_run_prints_the_script_and_the_command(fakes, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert slurm.main([*SLURM_ARGS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    script = (REPO / "launch/slurm.sbatch").read_text()
    assert script in out
    assert shlex.split(out.splitlines()[-1]) == [*SBATCH, "launch/slurm.sbatch", *JAXLM_ARGS]
    directives = dict((line.split()[1].lstrip("-") + "=").split("=")[:2]
                      for line in script.splitlines() if line.startswith("#SBATCH "))
    assert directives["ntasks-per-node"] == "1" and directives["signal"] == "TERM@300"
    assert fakes.calls() == []


@pytest.mark.parametrize("train_exit, requeued", [(0, False), (75, True), (1, False)])
def test_slurm_submits_the_script_which_runs_jaxlm_under_srun(fakes, capfd, monkeypatch,
                                                              train_exit, requeued):
    monkeypatch.chdir(REPO)
    assert slurm.main(SLURM_ARGS) == 0
    assert "Submitted batch job 4242" in capfd.readouterr().out
    [call] = fakes.calls("sbatch")
    assert call["argv"] == [*SBATCH[1:], "launch/slurm.sbatch", *JAXLM_ARGS]
    # What SLURM then does on the first node: the submitted script with its arguments.
    fakes.rules(("srun", [], [("", train_exit)]))
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="4",
               SLURM_JOB_NODELIST="gpu[01-04]", SLURM_CPUS_ON_NODE="96",
               JAXLM_PYTHON="/shared/venv/bin/python", JAXLM_REQUEUE="1")
    done = subprocess.run(["bash", *call["argv"][len(SBATCH) - 1:]], env=env,
                          capture_output=True, text=True)
    assert done.returncode == train_exit
    [srun] = fakes.calls("srun")
    assert srun["argv"] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=96",
                            "/shared/venv/bin/python", "-m", "jaxlm.cli", "train", *JAXLM_ARGS]
    assert [c["argv"] for c in fakes.calls("scontrol")] == ([["requeue", "4242"]] if requeued else [])


def test_slurm_layout_gives_each_process_all_gpus_of_its_node():
    """What srun sets for task 2 of the 4 one-per-node tasks: jaxlm.distributed makes it
    process 2 of 4, coordinated by the first node, with every GPU of its node."""
    from jaxlm import distributed
    env = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[01-04]", SLURM_NTASKS="4",
               SLURM_PROCID="2", SLURM_LOCALID="0", SLURM_STEP_NUM_NODES="4",
               CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    plan = distributed.detect(env=env, tpu_vm=False)
    assert (plan.kind, plan.num_processes, plan.process_id, plan.local_device_ids) == \
        ("slurm", 4, 2, None)
    assert plan.coordinator == f"gpu01:{4242 % 4096 + 65535 - 4095}"


@pytest.mark.parametrize("change, message", [
    (["--config", "configs/missing.py"], "--config: config file not found: configs/missing.py"),
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--gpus-per-node", "17"], "--gpus-per-node 17: must be 1 to 16"),
    (["--nodes", "3"], "configs/llama_1b.py on 24 devices: config.data.global_batch_size"),
    (["--workdir", "runs/x"], "--workdir 'runs/x': 4 processes"),
])
def test_slurm_bad_input_fails_before_sbatch(fakes, capfd, change, message):
    args = with_changes(SLURM_ARGS, dict([change]))
    assert slurm.main(args) == 2
    err = capfd.readouterr().err
    assert err.startswith("slurm: ") and message in err and len(err.splitlines()) == 1
    assert fakes.calls() == []


def test_launchers_import_no_jax():
    """They run on a laptop with only the cloud CLIs: a dry run (config checks included)
    imports no JAX."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['tpu_pod.py', *{TPU_ARGS!r}, '--dry-run']\n"
            "try: runpy.run_path('launch/tpu_pod.py', run_name='__main__')\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
