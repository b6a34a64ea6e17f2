"""Shared pieces of the launcher tests: fake gcloud / kubectl / xpk / sbatch / srun
executables on PATH that record their arguments, and helpers to read dry-run output."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import sys
import textwrap

import pytest

from jaxlm.launch import common as launchers

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

# One TPU pod command line several tests start from.
TPU_ARGS = ["--name", "pod1", "--zone", "us-east5-a", "--project", "proj",
            "--accelerator-type", "v5p-128", "--config", "configs/llama3_8b.py",
            "--workdir", "gs://bucket/runs/llama", "--config.train.steps=1000"]

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
