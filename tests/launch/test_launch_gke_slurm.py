"""launch/gke/render.py and launch/slurm.py: rendered manifests and batch scripts, the real
path against fake kubectl / xpk / sbatch / srun, one clear error per bad input; and no
launcher imports JAX."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

import pytest
import yaml
from launch_fakes import (
    REPO,
    TPU_ARGS,
    commands,
    fakes,  # noqa: F401 - a fixture
    gke,
    slurm,
    with_changes,
)

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
    # jaxlm's own parser takes them, and jaxlm.parallel.distributed starts process 5 of 16 from them.
    from jaxlm import cli, config
    from jaxlm.parallel import distributed
    parsed = cli.build_parser().parse_args(config.split_overrides(argv)[0])
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


def test_slurm_layout_gives_each_process_all_gpus_of_its_node(monkeypatch):
    """What srun sets for task 2 of the 4 one-per-node tasks: jaxlm.parallel.distributed makes it
    process 2 of 4, coordinated by the first node, with every GPU of its node."""
    from jax._src.clusters import slurm_cluster

    from jaxlm.parallel import distributed
    env = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[01-04]", SLURM_NTASKS="4",
               SLURM_PROCID="2", SLURM_LOCALID="0", SLURM_STEP_NUM_NODES="4",
               CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    plan = distributed.detect(env=env, tpu_vm=False)
    assert (plan.kind, plan.num_processes, plan.process_id, plan.local_device_ids) == \
        ("slurm", 4, 2, tuple(range(8)))
    # JAX's own SLURM detection names the coordinator (jaxlm passes none of its own).
    assert plan.coordinator is None
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert slurm_cluster.SlurmCluster.get_coordinator_address(None, None) == \
        f"gpu01:{4242 % 4096 + 65535 - 4095}"


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
