#!/usr/bin/env python3
"""Run `jaxlm train` on GKE: render a JobSet for a TPU or GPU node pool and `kubectl apply` it
(or, for TPUs, run the equivalent `xpk workload create`).

    python launch/gke/render.py tpu --name llama8b --image REGISTRY/jaxlm:TAG \\
        --tpu v5p-128 [--topology 4x4x4] [--hosts 16] --config configs/llama3_8b.py \\
        --workdir gs://my-bucket/runs/llama3_8b [--config.train.steps=1000] [--dry-run]
    python launch/gke/render.py gpu --name llama1b --image REGISTRY/jaxlm-gpu:TAG \\
        --hosts 4 --gpus-per-host 8 --gpu-type nvidia-h100-80gb \\
        --config configs/llama_1b.py --workdir gs://my-bucket/runs/llama_1b --dry-run
    python launch/gke/render.py tpu --name llama8b --xpk --cluster my-cluster ...  # via XPK
    python launch/gke/render.py tpu --name llama8b --delete                        # tear down

--dry-run prints the rendered manifest inside the `kubectl apply` command that would submit
it, then the commands to follow the run, and for TPUs the equivalent XPK command. The image
is launch/gke/Dockerfile's (jaxlm at --image-workdir). The config and overrides are
validated here for the pool's device count, and --hosts against the topology, before
anything is submitted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import string
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from a checkout

from jaxlm.launch import common as launchers  # noqa: E402
from jaxlm.launch.common import LaunchError  # noqa: E402

PROG = "gke"
TEMPLATES = pathlib.Path(__file__).resolve().parent
REPLICATED_JOB = {"tpu": "slice", "gpu": "node"}
MAX_NAME = 40  # pod hostnames <name>-slice-<j>-<i> must stay within 63 characters
MAX_GPUS_PER_HOST = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/gke/render.py", description=__doc__.split("\n")[0],
                                epilog="--config.KEY=VALUE arguments are passed to jaxlm train.")
    p.add_argument("accelerator", choices=["tpu", "gpu"])
    p.add_argument("--name", required=True, help="JobSet (or XPK workload) name")
    p.add_argument("--image", help="container image with jaxlm (launch/gke/Dockerfile)")
    p.add_argument("--config", help="config file inside this checkout (and the image)")
    p.add_argument("--workdir", help="gs://... shared by every pod")
    p.add_argument("--hosts", type=int, default=None,
                   help="pods, one per node (tpu: checked against the topology)")
    p.add_argument("--tpu", help="tpu: accelerator type of the slice, e.g. v5p-128, v6e-16")
    p.add_argument("--topology", default=None,
                   help="tpu: the node pool's chip grid (default: the type's, e.g. 4x4x4)")
    p.add_argument("--gpus-per-host", type=int, default=8, help="gpu: GPUs per node")
    p.add_argument("--gpu-type", default="nvidia-h100-80gb",
                   help="gpu: node label cloud.google.com/gke-accelerator")
    p.add_argument("--namespace", default="default")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="JobSet restarts of all pods after a failure")
    p.add_argument("--grace-seconds", type=int, default=300,
                   help="time to save a checkpoint after SIGTERM")
    p.add_argument("--port", type=int, default=8476, help="coordinator port on pod 0")
    p.add_argument("--image-workdir", default="/jaxlm", help="jaxlm's directory in the image")
    p.add_argument("--xpk", action="store_true",
                   help="tpu: submit with `xpk workload create` instead of a JobSet")
    p.add_argument("--cluster", default=None, help="xpk: the GKE cluster")
    p.add_argument("--project", default=None, help="xpk: project (default: gcloud's)")
    p.add_argument("--zone", default=None, help="xpk: zone (default: gcloud's)")
    p.add_argument("--num-slices", type=int, default=1, help="xpk: slices joined over DCN")
    p.add_argument("--delete", action="store_true", help="only delete the JobSet / workload")
    p.add_argument("--dry-run", action="store_true", help="print every command; run nothing")
    return p


def yaml_str(text: str) -> str:
    """A YAML scalar for any string: JSON's double-quoted form is valid YAML."""
    return json.dumps(text)


def render(template: str, values: dict[str, object]) -> str:
    """Fills a template's ${...}; strings become quoted scalars, numbers stay numbers."""
    body = (TEMPLATES / template).read_text()
    body = "\n".join(line for line in body.splitlines() if not line.startswith("#")) + "\n"
    return string.Template(body).substitute(
        {k: yaml_str(v) if isinstance(v, str) else v for k, v in values.items()})


def container_command(config: str, workdir: str, overrides: list[str], coordinator: str,
                      hosts: int) -> str:
    """The pod's shell command: `jaxlm train` with explicit start-up flags, the process id
    being the pod's index in its Indexed Job; exec'd so jaxlm receives SIGTERM itself."""
    head = launchers.train_argv(config, workdir, [], "--coordinator", coordinator,
                                "--num-processes", str(hosts))
    return " ".join(["exec jaxlm", shlex.join(head), "--process-id $JOB_COMPLETION_INDEX",
                     *map(shlex.quote, overrides)])


def xpk_argv(args: argparse.Namespace, tpu: launchers.TpuSlice, config: str,
             overrides: list[str]) -> list[str]:
    """XPK sets up the slices (and DCN between them); every pod finds the others through
    the TPU environment GKE gives it, so plain `jaxlm train` is enough."""
    train = launchers.train_argv(config, args.workdir, overrides)
    where = [f"--{k}={v}" for k, v in (("project", args.project), ("zone", args.zone)) if v]
    return ["xpk", "workload", "create", f"--cluster={args.cluster or '<cluster>'}",
            f"--workload={args.name}", f"--docker-image={args.image}",
            f"--tpu-type={tpu.accelerator_type}", f"--num-slices={args.num_slices}",
            f"--max-restarts={args.max_restarts}", "--restart-on-user-code-failure", *where,
            f"--command=cd {shlex.quote(args.image_workdir)} && jaxlm {shlex.join(train)}"]


def follow_up(args: argparse.Namespace, run: launchers.Runner) -> None:
    ns = f"--namespace={args.namespace}"
    selector = (f"jobset.sigs.k8s.io/jobset-name={args.name},"
                f"batch.kubernetes.io/job-completion-index=0")
    run.comment("then:")
    run.comment(f"  kubectl get jobset {args.name} {ns}                # state, restarts")
    run.comment(f"  kubectl logs -f -l {selector} {ns}    # process 0's log")
    run.comment(f"  python launch/gke/render.py {args.accelerator} --name {args.name} "
                f"{ns} --delete")


def delete(args: argparse.Namespace, run: launchers.Runner) -> None:
    if args.xpk:
        where = [f"--{k}={v}" for k, v in (("project", args.project), ("zone", args.zone)) if v]
        run.run(["xpk", "workload", "delete", f"--cluster={args.cluster}",
                 f"--workload={args.name}", *where, "--force"])
    else:
        run.run(["kubectl", "delete", "jobset", args.name, f"--namespace={args.namespace}"])


def launch(argv: list[str]) -> int:
    rest, overrides = launchers.split_overrides(argv)
    args = build_parser().parse_args(rest)
    launchers.check_name(args.name, "--name", MAX_NAME)
    if args.xpk and (args.accelerator != "tpu" or not args.cluster):
        raise LaunchError("--xpk is for tpu and needs --cluster")
    run = launchers.Runner(args.dry_run)
    if args.delete:
        delete(args, run)
        return 0
    for flag in ("image", "config", "workdir") + (("tpu",) if args.accelerator == "tpu" else ()):
        if not getattr(args, flag):
            raise LaunchError(f"--{flag} is required to launch a run")
    if not re.fullmatch(r"[^\s\"']+", args.image):
        raise LaunchError(f"--image {args.image!r}: expected an image reference such as "
                          f"us-docker.pkg.dev/PROJECT/REPO/jaxlm:TAG")
    if args.num_slices < 1 or (args.num_slices > 1 and not args.xpk):
        raise LaunchError(f"--num-slices {args.num_slices}: several slices (joined over DCN) "
                          f"are submitted with --xpk; a JobSet here runs one slice")
    if args.accelerator == "tpu":
        tpu = launchers.tpu_slice(args.tpu, "--tpu", args.topology)
        if args.hosts is not None and args.hosts != tpu.hosts:
            raise LaunchError(
                f"--hosts {args.hosts} does not match --tpu {args.tpu} (topology "
                f"{tpu.gke_topology}): {tpu.chips} chips at {tpu.chips_per_host} per host are "
                f"{tpu.hosts} hosts")
        hosts, devices = tpu.hosts, tpu.chips * args.num_slices
        shape = (f"{tpu.accelerator_type}, topology {tpu.gke_topology}: {tpu.chips} chips on "
                 f"{hosts} hosts ({tpu.chips_per_host} per pod)")
    else:
        if args.hosts is None or args.hosts < 1:
            raise LaunchError("--hosts: the number of GPU nodes (one pod each) is required")
        if not 1 <= args.gpus_per_host <= MAX_GPUS_PER_HOST:
            raise LaunchError(f"--gpus-per-host {args.gpus_per_host}: must be 1 to "
                              f"{MAX_GPUS_PER_HOST}")
        hosts, devices = args.hosts, args.hosts * args.gpus_per_host
        shape = f"{hosts} nodes x {args.gpus_per_host} {args.gpu_type} GPUs"
    launchers.check_workdir(args.workdir, hosts * args.num_slices, allow_shared_path=False)
    config = launchers.check_config(args.config, overrides, devices, inside_repo=True)
    run.comment(f"{shape}; {hosts * args.num_slices} jaxlm processes, {devices} devices; "
                f"{config} checked for that")
    if args.xpk:
        run.run(xpk_argv(args, tpu, config, overrides))
        return 0

    job = REPLICATED_JOB[args.accelerator]
    coordinator = f"{args.name}-{job}-0-0.{args.name}:{args.port}"
    values = dict(NAME=args.name, NAMESPACE=args.namespace, MAX_RESTARTS=args.max_restarts,
                  HOSTS=hosts, GRACE_SECONDS=args.grace_seconds, IMAGE=args.image,
                  IMAGE_WORKDIR=args.image_workdir, PORT=args.port,
                  COMMAND=container_command(config, args.workdir, overrides, coordinator, hosts))
    if args.accelerator == "tpu":
        values.update(GKE_ACCELERATOR=tpu.gke_accelerator, TOPOLOGY=tpu.gke_topology,
                      CHIPS_PER_HOST=tpu.chips_per_host)
    else:
        values.update(GPU_TYPE=args.gpu_type, GPUS_PER_HOST=args.gpus_per_host)
    manifest = render(f"jobset_{args.accelerator}.yaml", values)
    run.run(["kubectl", "apply", "-f", "-"], stdin_text=manifest)
    follow_up(args, run)
    if args.accelerator == "tpu" and args.dry_run:
        run.comment("the same run through XPK instead (pods find each other from the TPU "
                    "environment GKE sets):")
        run.comment(shlex.join(xpk_argv(args, tpu, config, overrides)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return launchers.main_guard(PROG, lambda: launch(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
