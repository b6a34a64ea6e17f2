"""Start-up detection (no runtime is started) and the local launcher with stand-in processes."""

import io
import re
import signal
import subprocess
import sys
import time

import pytest
from jax._src.clusters import slurm_cluster

from jaxlm import cli, errors
from jaxlm.launch import local as launch_local
from jaxlm.parallel import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-020],login1",
         "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
         "SLURM_STEP_NUM_NODES": "4"}


def test_nothing_set_is_a_single_process():
    assert distributed.detect(env={}, tpu_vm=False) == distributed.Plan("single")
    assert distributed.detect(env={}, tpu_vm=True).kind == "tpu"  # JAX asks the TPU metadata


def test_explicit_flags_and_their_variables():
    plan = distributed.detect("10.0.0.1:1234", 4, 3, env={}, tpu_vm=False)
    assert plan == distributed.Plan("explicit", "10.0.0.1:1234", 4, 3)
    env = {"JAXLM_COORDINATOR": "host:99", "JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": "1"}
    assert distributed.detect(env=env, tpu_vm=False) == distributed.Plan("explicit", "host:99", 2, 1)
    assert distributed.detect(process_id=0, env=env, tpu_vm=False).process_id == 0  # flag wins
    local = distributed.detect(env={**env, "JAXLM_CPU_COLLECTIVES": "gloo"}, tpu_vm=False)
    assert (local.kind, local.cpu_collectives) == ("local", "gloo")
    # Flags win over SLURM and a TPU VM.
    assert distributed.detect("h:1", 2, 0, env=SLURM, tpu_vm=True).kind == "explicit"


@pytest.mark.parametrize("args, message", [
    (("h:1", None, 0), "missing --num-processes"),
    ((None, 2, None), "missing --coordinator, --process-id"),
    (("h:1", 2, 2), r"process id 2 is not in \[0, 2\)"),
    (("h", 2, 0), "'h': expected HOST:PORT"),
])
def test_incomplete_or_inconsistent_flags_are_named(args, message):
    with pytest.raises(distributed.DistributedConfigError, match=message):
        distributed.detect(*args, env={}, tpu_vm=False)


def test_slurm_uses_jax_own_detection(monkeypatch):
    """JAX's SLURM detection names the coordinator (jaxlm passes none where JAX reads the
    node list right) and the ids; one task per node drives all of the node's GPUs."""
    plan = distributed.detect(env={**SLURM, "SLURM_GPUS_ON_NODE": "8"}, tpu_vm=False)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    assert plan.coordinator is None
    assert slurm_cluster.SlurmCluster.get_coordinator_address(None, None) == \
        f"gpu017:{4242 % 4096 + 61440}"
    assert (plan.kind, plan.num_processes, plan.process_id) == ("slurm", 4, 2)
    assert plan.local_device_ids == tuple(range(8))  # one task per node: all of its GPUs
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "5000")
    assert slurm_cluster.SlurmCluster.get_coordinator_address(None, "5000") == "gpu017:5000"
    # Where JAX misreads the node list, jaxlm names the first host itself, port as JAX would.
    for node_list, first in (("gpu[3-4]-ib,x", "gpu3-ib"), ("a[7]", "a7")):
        env = {**SLURM, "SLURM_STEP_NODELIST": node_list, "SLURM_GPUS_ON_NODE": "8"}
        assert distributed.jax_misreads_node_list(node_list)
        assert distributed.detect(env=env, tpu_vm=False).coordinator == \
            f"{first}:{4242 % 4096 + 61440}"
        assert distributed.detect(env={**env, "JAX_COORDINATOR_PORT": "5000"},
                                  tpu_vm=False).coordinator == f"{first}:5000"


@pytest.mark.parametrize("node_list, first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-0015],host2", "node001"),
    ("node[001,007-015],host2", "node001"), ("a[7]", "a7"), ("gpu[3-4]-ib,x", "gpu3-ib"),
])
def test_first_slurm_host(node_list, first, monkeypatch):
    assert distributed.first_slurm_host(node_list) == first
    # The formats JAX's parser documents (it misreads "a[7]" as "a7]" and drops "-ib").
    if node_list.startswith("node"):
        monkeypatch.setenv("SLURM_JOB_ID", "1")
        monkeypatch.setenv("SLURM_STEP_NODELIST", node_list)
        expected = slurm_cluster.SlurmCluster.get_coordinator_address(None, "1").split(":")[0]
        assert first == expected


def test_slurm_device_binding_and_single_task():
    many = {**SLURM, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_NODES": "2"}
    # Several tasks per node: JAX's own binding, a GPU per task (device SLURM_LOCALID).
    assert distributed.detect(env=many, tpu_vm=False).local_device_ids is None
    bound = {**many, "CUDA_VISIBLE_DEVICES": "1"}  # srun --gpus-per-task bound it already
    assert distributed.detect(env=bound, tpu_vm=False).local_device_ids == (0,)
    single = {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert distributed.detect(env=single, tpu_vm=False).kind == "single"
    with pytest.raises(distributed.DistributedConfigError, match="SLURM_NTASKS"):
        distributed.detect(env={**SLURM, "SLURM_NTASKS": "four"}, tpu_vm=False)


def test_heartbeat_timeout_setting():
    assert distributed.heartbeat_timeout_s({}) == distributed.DEFAULT_HEARTBEAT_TIMEOUT_S == 20
    assert distributed.heartbeat_timeout_s({"JAXLM_HEARTBEAT_TIMEOUT_S": "45"}) == 45
    with pytest.raises(distributed.DistributedConfigError, match="JAXLM_HEARTBEAT_TIMEOUT_S"):
        distributed.heartbeat_timeout_s({"JAXLM_HEARTBEAT_TIMEOUT_S": "0"})


def test_cli_reports_bad_start_up_flags_before_anything_runs(capsys):
    assert cli.main(["train", "--coordinator", "h:1", "--num-processes", "2"]) == 2
    assert "missing --process-id" in capsys.readouterr().err


# ---- the launcher, with stand-in processes ---------------------------------------------

def test_child_environment():
    env = launch_local.child_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
                                  "PATH": "/bin"}, process_id=1, num_processes=2,
                                 devices_per_process=4, coordinator="127.0.0.1:5")
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    plan = distributed.detect(env=env, tpu_vm=False)
    assert plan == distributed.Plan("local", "127.0.0.1:5", 2, 1, None, "gloo")
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"


def test_exit_codes_are_the_trainer_s():
    """The launcher describes exit codes from the one table the commands exit by."""
    assert errors.describe(errors.PREEMPTED) == "code 75 (preempted, checkpoint saved)"
    assert errors.describe(errors.ABORTED).startswith("code 130 (aborted")
    assert errors.describe(errors.NONFINITE) == "code 3 (non-finite loss)"
    assert errors.describe(-9) == "code -9 (killed by SIGKILL)"
    assert launch_local.shell_code(-9) == 137 and launch_local.shell_code(3) == 3


CHILD = """
import os, sys, time
i = int(os.environ["JAXLM_PROCESS_ID"])
print(f"hello from {i} of {os.environ['JAXLM_NUM_PROCESSES']}", flush=True)
if i == 1:
    sys.exit(3)
os.read(os.open(os.devnull, os.O_RDONLY), 1)  # returns at once: exits 0
"""


def test_outputs_are_prefixed_and_the_first_failure_is_returned():
    out = io.StringIO()
    code = launch_local.launch([sys.executable, "-c", CHILD], 2, 1, out=out)
    text = out.getvalue()
    assert code == 3
    assert "[p0] hello from 0 of 2" in text and "[p1] hello from 1 of 2" in text
    assert "[launch] process 1 exited with code 3" in text
    assert "[launch] exit codes: p0=0, p1=3" in text


HANGING_CHILD = """
import os, signal, sys
if os.environ["JAXLM_PROCESS_ID"] == "1":
    sys.exit(5)
print("waiting for a peer that is gone", flush=True)
signal.pause()  # a process stuck in a collective
"""


def test_a_process_left_hanging_is_killed_after_the_grace_period():
    out = io.StringIO()
    start = time.monotonic()
    code = launch_local.launch([sys.executable, "-c", HANGING_CHILD], 2, 1, grace_s=1.0, out=out)
    text = out.getvalue()
    assert code == 5 and time.monotonic() - start < 30
    assert "[launch] process 0 still running 1 s after process 1 failed: killing it" in text
    assert re.search(r"process 0 exited with code -9 \(killed by SIGKILL\), [\d.]+ s after process 1", text)


SIGNALLED_CHILD = """
import os, signal, sys
def stop(signum, frame):
    print(f"got {signal.Signals(signum).name}", flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
signal.pause()
"""

LAUNCHER = f"""
import sys
from jaxlm.launch import local as launch_local
sys.exit(launch_local.launch([sys.executable, "-c", {SIGNALLED_CHILD!r}], 2, 1))
"""


def test_sigterm_to_the_launcher_reaches_every_process():
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while sum(line.endswith("] ready\n") for line in lines) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, lines
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 75, text
    assert "[p0] got SIGTERM" in text and "[p1] got SIGTERM" in text
    assert "[launch] SIGTERM: passing it on to every process" in text


def test_usage_errors():
    assert launch_local.main(["local", "--processes", "2", "--devices-per-process", "4"]) == 2
    assert launch_local.main(["local", "--processes", "2", "--devices-per-process", "4", "--"]) == 2
    assert launch_local.main(["local", "--processes", "0", "--devices-per-process", "4", "--",
                              "train"]) == 2
