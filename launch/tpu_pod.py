#!/usr/bin/env python3
"""Train on a Cloud TPU slice (TPU VMs): create or reuse the slice, install jaxlm on every
worker, run the same `jaxlm train` on all of them, stream worker 0's log, delete on request.

    python launch/tpu_pod.py --name llama8b --zone us-east5-a --project my-project \\
        --accelerator-type v5p-128 --config configs/llama3_8b.py \\
        --workdir gs://my-bucket/runs/llama3_8b [--queued] [--spot] [--config.train.steps=1000]
    python launch/tpu_pod.py ... --dry-run            # print every command, run nothing
    python launch/tpu_pod.py --name llama8b --zone us-east5-a --attach   # stream again
    python launch/tpu_pod.py --name llama8b --zone us-east5-a --delete   # tear down

Each worker runs plain `jaxlm train`: jaxlm.parallel.distributed finds the other workers from the TPU
VM's metadata. The run is started with nohup, so it survives this machine disconnecting;
`--attach` streams worker 0's log again and exits with the run's exit code (75: preempted
after a checkpoint; run the same command again to resume on the same slice).

The config and its overrides are validated here for the slice's device count before any
gcloud command runs. Workers get this checkout (tracked and untracked, not git-ignored
files; default) or a `git clone` (--git-url/--git-ref), installed with `pip install -e
".[tpu]"` into ~/jaxlm-venv under a uv-provided Python (TPU VM images ship Python 3.10).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from jaxlm.launch import common as launchers  # noqa: E402
from jaxlm.launch.common import LaunchError  # noqa: E402

PROG = "tpu_pod"
TARBALL = "jaxlm-src.tar.gz"
# Files on each worker: the source tree, the venv, and the run's log / pid / exit code.
REMOTE_SRC, REMOTE_VENV = "~/jaxlm", "~/jaxlm-venv"
LOG, PID, EXIT = "~/jaxlm-run.log", "~/jaxlm-run.pid", "~/jaxlm-run.exit"
# Guards the install and the start: a run still alive on a reused slice is left alone.
NOT_RUNNING = (f"if test -f {PID} && kill -0 $(cat {PID}) 2>/dev/null; then echo \"a jaxlm run "
               f"is still running (pid $(cat {PID})): use --attach, or stop it first\" >&2; "
               f"exit 1; fi")
READY, QUEUED_ACTIVE = "READY", "ACTIVE"
QUEUED_FAILED = ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.split("\n")[0],
                                epilog="--config.KEY=VALUE arguments are passed to jaxlm train.")
    p.add_argument("--name", required=True, help="TPU (and queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None, help="default: gcloud's configured project")
    p.add_argument("--accelerator-type", help="e.g. v5p-128, v6e-16, v5litepod-16, v4-32")
    p.add_argument("--runtime-version", default=None,
                   help="TPU VM image (default per generation, e.g. v2-alpha-tpuv5 for v5p)")
    p.add_argument("--queued", action="store_true",
                   help="request the slice as a queued resource and wait until it is ACTIVE")
    p.add_argument("--spot", action="store_true", help="spot capacity (may be preempted)")
    p.add_argument("--config", help="config file inside this checkout")
    p.add_argument("--workdir", help="gs://... (every host writes its checkpoint shards there)")
    p.add_argument("--git-url", default=None,
                   help="workers clone this repository instead of receiving this checkout")
    p.add_argument("--git-ref", default="main", help="branch, tag or commit for --git-url")
    p.add_argument("--python-version", default="3.11", help="Python of the workers' venv")
    p.add_argument("--attach", action="store_true",
                   help="only stream worker 0's log of the current run until it ends")
    p.add_argument("--delete", action="store_true",
                   help="only delete the slice (with --queued: the queued resource and its TPU)")
    p.add_argument("--delete-when-done", action="store_true",
                   help="delete the slice after a run that exits 0")
    p.add_argument("--queue-timeout-minutes", type=float, default=720.0)
    p.add_argument("--poll-seconds", type=float, default=30.0,
                   help="interval between queued-resource state checks")
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
    return p


def gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", *words, args.name, f"--zone={args.zone}", *project]


def ssh(args: argparse.Namespace, worker: str, command: str) -> list[str]:
    return [*gcloud(args, "tpu-vm", "ssh"), f"--worker={worker}", "--quiet",
            f"--command={command}"]


# ----------------------------------------------------------------------------- steps

def ensure_slice(args: argparse.Namespace, tpu: launchers.TpuSlice, run: launchers.Runner) -> None:
    """Creates the slice unless one named --name exists; waits for a queued one."""
    runtime = args.runtime_version or tpu.default_runtime
    spot = ["--spot"] if args.spot else []
    if args.queued:
        _create_unless_described(
            args, run, "queued-resources", "state.state", f"no queued resource named "
            f"{args.name}: request one", [f"--node-id={args.name}",
                                          f"--accelerator-type={tpu.accelerator_type}",
                                          f"--runtime-version={runtime}", *spot])
        wait_until_active(args, run)
        return
    described = _create_unless_described(
        args, run, "tpu-vm", "state,acceleratorType", f"no TPU named {args.name}: create it "
        f"(an existing READY {tpu.accelerator_type} is reused)",
        [f"--accelerator-type={tpu.accelerator_type}", f"--version={runtime}", *spot])
    if described is None:
        return
    state, _, existing_type = described.partition("\t")
    existing_type = existing_type.strip().lower()
    if existing_type and existing_type != tpu.accelerator_type:
        raise LaunchError(f"--name {args.name}: the existing TPU is a {existing_type}, not a "
                          f"{tpu.accelerator_type}; pick another --name or --delete it first")
    if state != READY:
        raise LaunchError(f"--name {args.name}: the existing TPU is {state}, not {READY}; "
                          f"wait, or --delete it and launch again")
    run.comment(f"reusing TPU {args.name} ({existing_type}, {state})")


def _create_unless_described(args: argparse.Namespace, run: launchers.Runner, kind: str,
                             fields: str, missing: str, create: list[str]) -> str | None:
    """`gcloud ... <kind> describe` (its `fields`), or, when nothing of that name exists,
    `gcloud ... <kind> create <create...>` and None."""
    described = run.query([*gcloud(args, kind, "describe"), f"--format=value({fields})"],
                          dry_run_answer=None)
    if described is None:
        run.comment(f"{'if that finds' if run.dry_run else 'found'} {missing}")
        run.run([*gcloud(args, kind, "create"), *create])
    return described


def wait_until_active(args: argparse.Namespace, run: launchers.Runner) -> None:
    describe = [*gcloud(args, "queued-resources", "describe"), "--format=value(state.state)"]
    if run.dry_run:
        run.comment(f"repeated every {args.poll_seconds:g} s until the state is "
                    f"{QUEUED_ACTIVE} (at most {args.queue_timeout_minutes:g} min):")
        run.query(describe, dry_run_answer=QUEUED_ACTIVE)
        return
    deadline = time.monotonic() + 60 * args.queue_timeout_minutes
    while True:
        state = run.query(describe, dry_run_answer=None)
        if state == QUEUED_ACTIVE:
            return
        if state in QUEUED_FAILED:
            raise LaunchError(f"queued resource {args.name} is {state}; see `gcloud compute "
                              f"tpus queued-resources describe {args.name} --zone={args.zone}`")
        if time.monotonic() > deadline:
            raise LaunchError(f"queued resource {args.name} still {state} after "
                              f"--queue-timeout-minutes={args.queue_timeout_minutes:g}")
        print(f"{PROG}: queued resource {args.name}: {state}", flush=True)
        time.sleep(args.poll_seconds)


def source_files() -> list[str]:
    """This checkout's files as git sees them: tracked and untracked, not ignored."""
    listed = subprocess.run(["git", "-C", str(launchers.REPO_ROOT), "ls-files", "--cached",
                             "--others", "--exclude-standard", "-z"],
                            capture_output=True, text=True, check=True).stdout
    return sorted(name for name in listed.split("\0") if name)


def pack_source(tarball: pathlib.Path, files: list[str]) -> None:
    with tarfile.open(tarball, "w:gz") as tar:
        for name in files:
            path = launchers.REPO_ROOT / name
            if path.is_file():  # a file deleted since `git ls-files` is skipped
                tar.add(path, arcname=name)


def install(args: argparse.Namespace, run: launchers.Runner) -> None:
    if args.git_url:
        fetch = (f"rm -rf {REMOTE_SRC} && git clone --quiet {shlex.quote(args.git_url)} "
                 f"{REMOTE_SRC} && git -C {REMOTE_SRC} checkout --quiet "
                 f"{shlex.quote(args.git_ref)}")
    else:
        tarball = pathlib.Path(tempfile.gettempdir()) / f"jaxlm-src-{args.name}.tar.gz"
        files = source_files()
        run.comment(f"pack {len(files)} files of {launchers.REPO_ROOT} (git ls-files --cached "
                    f"--others --exclude-standard) into {tarball}")
        if not run.dry_run:
            pack_source(tarball, files)
        try:
            run.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball),
                     f"{args.name}:{TARBALL}", "--worker=all", f"--zone={args.zone}",
                     *([f"--project={args.project}"] if args.project else []), "--quiet"])
        finally:
            if not run.dry_run:
                tarball.unlink(missing_ok=True)
        fetch = f"rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC} && tar -xzf ~/{TARBALL} -C {REMOTE_SRC}"
    uv = "~/.local/bin/uv"
    setup = " && ".join([
        NOT_RUNNING,
        fetch,
        f"(test -x {uv} || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"(test -x {REMOTE_VENV}/bin/python || {uv} venv --quiet "
        f"--python {shlex.quote(args.python_version)} {REMOTE_VENV})",
        f"cd {REMOTE_SRC}",
        f"{uv} pip install --quiet --python {REMOTE_VENV}/bin/python -e \".[tpu]\"",
    ])
    run.comment("install jaxlm on every worker")
    run.run(ssh(args, "all", setup))


def start(args: argparse.Namespace, config: str, overrides: list[str],
          run: launchers.Runner) -> None:
    """Starts `jaxlm train` on every worker under nohup; refuses if a run is still alive."""
    train = launchers.train_argv(config, args.workdir, overrides)
    inner = f"{REMOTE_VENV}/bin/jaxlm {shlex.join(train)}; echo $? > {EXIT}"
    command = " && ".join([
        f"cd {REMOTE_SRC}",
        NOT_RUNNING,
        f"rm -f {EXIT}",
        # setsid + nohup: the run outlives this ssh session.
        f"(setsid nohup bash -c {shlex.quote(inner)} > {LOG} 2>&1 < /dev/null & echo $! > {PID})",
    ])
    run.comment("run the same jaxlm train on every worker")
    run.run(ssh(args, "all", command))


def stream(args: argparse.Namespace, run: launchers.Runner) -> None:
    """Follows worker 0's log until the run's process ends; exits with the run's code."""
    command = (f"tail -n +1 -F --pid=$(cat {PID}) {LOG}; test -f {EXIT} || "
               f"{{ echo \"the run on worker 0 ended without an exit code (killed?)\" >&2; "
               f"exit 1; }}; exit $(cat {EXIT})")
    run.comment("stream worker 0's log until the run ends (Ctrl-C leaves the run going)")
    try:
        run.run(ssh(args, "0", command))
    except KeyboardInterrupt:
        raise LaunchError(f"stopped streaming; the run goes on: `launch/tpu_pod.py --name "
                          f"{args.name} --zone {args.zone} --attach` streams it again") from None


def delete(args: argparse.Namespace, run: launchers.Runner) -> None:
    if args.queued:
        run.run([*gcloud(args, "queued-resources", "delete"), "--force", "--quiet"])
    else:
        run.run([*gcloud(args, "tpu-vm", "delete"), "--quiet"])


# ----------------------------------------------------------------------------- main

def launch(argv: list[str]) -> int:
    rest, overrides = launchers.split_overrides(argv)
    args = build_parser().parse_args(rest)
    launchers.check_name(args.name, "--name", 63)
    run = launchers.Runner(args.dry_run)
    if args.delete or args.attach:
        if args.delete and args.attach:
            raise LaunchError("--delete and --attach exclude each other")
        (delete if args.delete else stream)(args, run)
        return 0
    for flag in ("accelerator_type", "config", "workdir"):
        if not getattr(args, flag):
            raise LaunchError(f"--{flag.replace('_', '-')} is required to launch a run")
    if ":" in args.accelerator_type:
        raise LaunchError(f"--accelerator-type {args.accelerator_type!r}: give a Cloud TPU "
                          f"accelerator type such as v5p-128 (its default chip grid is used)")
    tpu = launchers.tpu_slice(args.accelerator_type, "--accelerator-type")
    launchers.check_workdir(args.workdir, tpu.hosts, allow_shared_path=True)
    config = launchers.check_config(args.config, overrides, tpu.devices, inside_repo=True)
    run.comment(f"{tpu.accelerator_type}: {tpu.chips} chips on {tpu.hosts} hosts; {tpu.hosts} "
                f"jaxlm processes, {tpu.devices} devices; {config} checked for that")
    ensure_slice(args, tpu, run)
    install(args, run)
    start(args, config, overrides, run)
    try:
        stream(args, run)
    except launchers.CommandFailed as e:
        if e.returncode == 75:
            print(f"{PROG}: the run was preempted after saving a checkpoint (exit 75); "
                  f"launch the same command again to resume", file=sys.stderr)
        raise
    if args.delete_when_done:
        delete(args, run)
    return 0


def main(argv: list[str] | None = None) -> int:
    return launchers.main_guard(PROG, lambda: launch(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
