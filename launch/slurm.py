#!/usr/bin/env python3
"""Submit `jaxlm train` to a SLURM GPU cluster: launch/slurm.sbatch, as it is, with the job's
shape on the sbatch command line (one task per node driving all its GPUs; see the script).

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --config configs/llama_1b.py \\
        --workdir /shared/runs/llama_1b [--partition gpu] [--time 24:00:00] [--requeue] \\
        [--config.train.steps=1000] [--dry-run]

The config and its overrides are validated here for nodes x gpus-per-node devices before
sbatch runs. --dry-run prints the batch script and the sbatch command, and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from jaxlm.launch import common as launchers  # noqa: E402
from jaxlm.launch.common import LaunchError  # noqa: E402

PROG = "slurm"
SCRIPT = pathlib.Path(__file__).resolve().with_name("slurm.sbatch")
MAX_GPUS_PER_NODE = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n")[0],
                                epilog="--config.KEY=VALUE arguments are passed to jaxlm train.")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True,
                   help="shared by every node: an absolute path on a shared filesystem or gs://")
    p.add_argument("--job-name", default="jaxlm")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--python", default=None,
                   help="Python with jaxlm installed on the nodes (default: python3 on PATH)")
    p.add_argument("--requeue", action="store_true",
                   help="requeue the job when jaxlm exits 75 (preempted after a checkpoint)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the batch script and the sbatch command; run nothing")
    return p


def sbatch_argv(args: argparse.Namespace, config: str, overrides: list[str]) -> list[str]:
    argv = ["sbatch", f"--job-name={args.job_name}", f"--nodes={args.nodes}",
            f"--gpus-per-node={args.gpus_per_node}", "--ntasks-per-node=1"]
    argv += [f"--{flag}={value}" for flag, value in
             (("partition", args.partition), ("account", args.account), ("time", args.time))
             if value]
    exports = [f"JAXLM_PYTHON={args.python}"] if args.python else []
    if args.requeue:
        argv.append("--requeue")
        exports.append("JAXLM_REQUEUE=1")
    if exports:
        argv.append(f"--export=ALL,{','.join(exports)}")
    script = os.path.relpath(SCRIPT) if SCRIPT.is_relative_to(pathlib.Path.cwd()) else str(SCRIPT)
    return [*argv, script, *launchers.train_argv(config, args.workdir, overrides)[1:]]


def submit(argv: list[str]) -> int:
    rest, overrides = launchers.split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.nodes < 1:
        raise LaunchError(f"--nodes {args.nodes}: must be at least 1")
    if not 1 <= args.gpus_per_node <= MAX_GPUS_PER_NODE:
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: must be 1 to "
                          f"{MAX_GPUS_PER_NODE}")
    launchers.check_name(args.job_name, "--job-name", 128)
    devices = args.nodes * args.gpus_per_node
    launchers.check_workdir(args.workdir, args.nodes, allow_shared_path=True)
    config = launchers.check_config(args.config, overrides, devices, inside_repo=False)
    run = launchers.Runner(args.dry_run)
    run.comment(f"{args.nodes} nodes x {args.gpus_per_node} GPUs: {args.nodes} jaxlm processes "
                f"(one per node), {devices} devices; {config} checked for that")
    if args.dry_run:
        run.comment(f"batch script {SCRIPT.name}, submitted as it is:")
        print(SCRIPT.read_text(), end="", flush=True)
        run.comment("command:")
    run.run(sbatch_argv(args, config, overrides))
    return 0


def main(argv: list[str] | None = None) -> int:
    return launchers.main_guard(PROG, lambda: submit(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
