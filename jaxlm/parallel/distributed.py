"""Starting JAX's multi-controller runtime, from flags or the environment.

Every process of a multi-host run executes the same `jaxlm train`; before anything touches
a device, `initialize()` connects it to the others through JAX's coordination service
(process 0 hosts it). Where the process count, the process id and the coordinator come
from, first match wins:

    explicit     --coordinator HOST:PORT --num-processes N --process-id I (or the
                 JAXLM_COORDINATOR / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID variables)
    local        the same variables plus JAXLM_CPU_COLLECTIVES=gloo, set by
                 `jaxlm launch local`: N processes of M simulated CPU devices on this host
    slurm        srun with more than one task: JAX's own SLURM detection
                 (`cluster_detection_method="slurm"`: SLURM_NTASKS, SLURM_PROCID, the first
                 host of SLURM_STEP_NODELIST, port JAX_COORDINATOR_PORT or one derived from
                 SLURM_JOB_ID), plus what it lacks (see `_slurm_plan`)
    tpu          a Cloud TPU VM (GCE or GKE; a Google TPU on the PCI bus): JAX reads the
                 slice's workers itself
    single       none of these: one process, no runtime started

Nothing happens at import. A process that stops sending heartbeats for
`heartbeat_timeout_s()` seconds (default 20; JAXLM_HEARTBEAT_TIMEOUT_S) is declared lost and
every other process terminates with JAX's message naming it, so no process waits forever
on a collective that cannot complete.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import re
import sys
import threading
import traceback
from typing import Any, Mapping, NoReturn

from jaxlm import console
from jaxlm.errors import UserError

ENV_COORDINATOR = "JAXLM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLM_PROCESS_ID"
ENV_CPU_COLLECTIVES = "JAXLM_CPU_COLLECTIVES"
ENV_HEARTBEAT_TIMEOUT = "JAXLM_HEARTBEAT_TIMEOUT_S"

DEFAULT_HEARTBEAT_TIMEOUT_S = 20
# How long an exiting process waits at the shutdown barrier for the others. A process
# that failed alone leaves at once (`exit_now`), so this only bounds odd cases.
SHUTDOWN_TIMEOUT_S = 30
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


class DistributedConfigError(UserError, ValueError):
    """Start-up settings are incomplete or inconsistent; the message names them."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the run. `kind`: explicit | local | slurm | tpu | single.
    None fields are left for JAX to find (tpu) or unused (single)."""

    kind: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_collectives: str | None = None

    def describe(self) -> str:
        if self.kind == "single":
            return "single process"
        if self.kind == "tpu":
            return "Cloud TPU VM (workers found by JAX)"
        return (f"{self.kind}: process {self.process_id} of {self.num_processes}, "
                f"coordinator {self.coordinator}")


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name}={value!r} is not an integer") from None


def _check_ids(num_processes: int, process_id: int, source: str) -> None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedConfigError(f"{source}: process id {process_id} is not in "
                                     f"[0, {num_processes})")


def _check_address(address: str, name: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedConfigError(f"{name}={address!r}: expected HOST:PORT")


def first_slurm_host(node_list: str) -> str:
    """The first host of a SLURM node list: 'a1,a2' -> 'a1'; 'gpu[003-010,12]-ib,x' ->
    'gpu003-ib' (a bracket holds numbers and ranges, zero padding kept)."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,]*))?", node_list.strip())
    prefix, ranges, suffix = match.group(1), match.group(2), match.group(3) or ""
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0]
    return f"{prefix}{first}{suffix}"


def jax_misreads_node_list(node_list: str) -> bool:
    """Whether JAX's SLURM detection gets the first host of `node_list` wrong: it drops
    the text after a bracket ('gpu[3-4]-ib' -> 'gpu3') and keeps the bracket of a single
    number ('a[7]' -> 'a7]')."""
    match = re.match(r"[^,\[]*\[([^\]]*)\]([^,]*)", node_list.strip())
    return bool(match) and (bool(match.group(2)) or not re.search(r"[,-]", match.group(1)))


def _gpu_count(env: Mapping[str, str]) -> int | None:
    """GPUs this node gives the task: SLURM's count, else the NVIDIA driver's."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    gpus = "/proc/driver/nvidia/gpus"
    return len(os.listdir(gpus)) if os.path.isdir(gpus) else None


def _slurm_plan(env: Mapping[str, str]) -> Plan | None:
    """JAX's SLURM detection names the coordinator, the process count and id, and binds
    one GPU to each task (device SLURM_LOCALID). What it lacks, jaxlm passes itself:
    - one task per node (jaxlm's layout, launch/slurm.sbatch) drives all of the node's
      GPUs, and a task whose GPUs srun already bound (CUDA_VISIBLE_DEVICES) drives those:
      JAX would pin either to a single device;
    - the first host when JAX misreads the node list (`jax_misreads_node_list`)."""
    if not all(v in env for v in _SLURM_VARS):
        return None
    num_processes = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    if num_processes <= 1:
        return None  # one task: nothing to coordinate
    process_id = _int(env["SLURM_PROCID"], "SLURM_PROCID")
    _check_ids(num_processes, process_id, "SLURM_NTASKS/SLURM_PROCID")
    nodes = _int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", 1)), "SLURM_STEP_NUM_NODES")
    local = None  # JAX's binding: device SLURM_LOCALID
    if env.get("CUDA_VISIBLE_DEVICES"):
        local = tuple(range(len(env["CUDA_VISIBLE_DEVICES"].split(","))))
    elif num_processes <= nodes:
        count = _gpu_count(env)
        if count is None:
            raise DistributedConfigError(
                "SLURM with one task per node: cannot tell how many GPUs this node has "
                "(no SLURM_GPUS_ON_NODE, no NVIDIA driver); set JAX_LOCAL_DEVICE_IDS=0,1,...")
        local = tuple(range(count))
    coordinator = None  # JAX's reading of SLURM_STEP_NODELIST and its port rule
    node_list = env["SLURM_STEP_NODELIST"]
    if jax_misreads_node_list(node_list):
        port = env.get("JAX_COORDINATOR_PORT") or str(
            _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))
        coordinator = f"{first_slurm_host(node_list)}:{port}"
    return Plan("slurm", coordinator, num_processes, process_id, local)


def running_on_tpu_vm() -> bool:
    """Whether this host has a Google TPU on its PCI bus (vendor 0x1ae0): what JAX's TPU
    start-up looks for before it asks the VM's metadata for the slice's workers."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(vendor).read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return False


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, *, env: Mapping[str, str] | None = None,
           tpu_vm: bool | None = None) -> Plan:
    """The plan for this process from flags and `env` (default os.environ); starts nothing.
    `tpu_vm` defaults to `running_on_tpu_vm()`."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise DistributedConfigError(
                f"multi-process start-up needs --coordinator, --num-processes and --process-id "
                f"together (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                f"missing {', '.join(missing)}")
        _check_address(coordinator, "--coordinator")
        _check_ids(num_processes, process_id, "--num-processes/--process-id")
        collectives = env.get(ENV_CPU_COLLECTIVES) or None
        if collectives not in (None, "gloo", "mpi"):
            raise DistributedConfigError(f"{ENV_CPU_COLLECTIVES}={collectives!r}: expected gloo or mpi")
        return Plan("local" if collectives else "explicit", coordinator, num_processes,
                    process_id, None, collectives)
    slurm = _slurm_plan(env)
    if slurm is not None:
        return slurm
    if tpu_vm is None:
        tpu_vm = running_on_tpu_vm()
    if tpu_vm:
        return Plan("tpu")
    return Plan("single")


def heartbeat_timeout_s(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    value = _int(env.get(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S), ENV_HEARTBEAT_TIMEOUT)
    if value < 1:
        raise DistributedConfigError(f"{ENV_HEARTBEAT_TIMEOUT}={value}: must be >= 1 second")
    return value


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Plan:
    """Detects the plan, starts JAX's runtime for it (not for a single process), then the
    backends (start_backends).
    Must run before anything initialises a JAX backend (jax.devices(), any computation)."""
    plan = detect(coordinator, num_processes, process_id)
    if plan.kind == "single":
        start_backends()
        return plan
    import jax

    if jax.distributed.is_initialized():
        return plan
    with console.native_output_held():
        _start_runtime(plan)
    start_backends()
    return plan


def _start_runtime(plan: Plan) -> None:
    import jax

    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout_s(),
                    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    if plan.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", plan.cpu_collectives)
        console.drop_native_stdout()  # Gloo's connection notes
    if plan.kind == "tpu":
        jax.distributed.initialize(**timeouts)
    elif plan.kind == "slurm":  # JAX reads SLURM's variables; None: its own choice
        jax.distributed.initialize(
            plan.coordinator, local_device_ids=list(plan.local_device_ids)
            if plan.local_device_ids is not None else None,
            cluster_detection_method="slurm", **timeouts)
    else:
        jax.distributed.initialize(
            plan.coordinator, plan.num_processes, plan.process_id,
            local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
            cluster_detection_method="deactivate", **timeouts)


def start_backends() -> None:
    """Initialises JAX's backends now, holding back what their native start-up prints
    (jaxlm.console): with libtpu installed on a machine without a TPU, its warnings about
    host bounds and worker hostnames before JAX falls back to the CPU. Python-level
    warnings (no GPU jaxlib for a GPU, ...) still show; a failure shows everything."""
    import jax

    with console.native_output_held():
        jax.devices()


def exit_now(code: int = 1) -> NoReturn:
    """Prints the exception being handled and leaves without JAX's shutdown barrier, so the
    other processes learn of the loss within one heartbeat timeout instead of waiting for a
    collective (or the barrier) this process will never join.

    A failed collective usually means another process died: then it first waits (up to one
    heartbeat timeout and a margin) for the coordination service to name the lost process,
    and says which it is. (JAX may terminate this process first, with its own message
    naming the lost process.)"""
    error = sys.exc_info()[1]
    traceback.print_exc()
    me = _process_index()
    if error is not None and _is_runtime_error(error):
        print(f"jaxlm: process {me}: a collective failed; waiting up to "
              f"{heartbeat_timeout_s() + 10} s for the coordination service to name a lost "
              f"process", file=sys.stderr, flush=True)
        print(f"jaxlm: process {me}: {_lost_processes(heartbeat_timeout_s() + 10)}",
              file=sys.stderr, flush=True)
    print(f"jaxlm: process {me} failed; exiting with code {code} without waiting for the "
          f"other processes", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _process_index() -> int:
    import jax
    return jax.process_index()


def _is_runtime_error(error: BaseException) -> bool:
    import jax
    return isinstance(error, jax.errors.JaxRuntimeError)


def _lost_processes(timeout_s: float) -> str:
    """Which processes the coordination service declares lost, as a sentence. Asking for
    the live devices returns once every process has asked or been declared dead."""
    import jax
    from jax.experimental import multihost_utils

    everyone = set(range(jax.process_count()))
    answer: dict[str, Any] = {}
    answered = threading.Event()

    def ask() -> None:  # leaving the block is another barrier: the answer comes before it
        try:
            with multihost_utils.live_devices(jax.devices()) as live:
                answer["live"] = {d.process_index for d in live}
                answered.set()
        except Exception as e:  # noqa: BLE001 - the service itself is gone, or a peer died
            answer.setdefault("error", e)
        answered.set()

    threading.Thread(target=ask, daemon=True).start()
    answered.wait(timeout_s)
    if "live" in answer:
        lost = sorted(everyone - answer["live"])
        return (f"lost process(es) {lost} (stopped sending heartbeats)" if lost else
                "every process is alive: the failure is not a lost process")
    if "error" in answer:
        return (f"the coordination service on process 0 cannot be reached: process 0 is "
                f"probably lost ({str(answer['error']).splitlines()[0][:200]})")
    return f"no process was declared lost within {timeout_s:.0f} s"


def local_rows(batch_sharding: Any, global_batch_size: int) -> list[int]:
    """The rows of the global batch this process feeds: those its devices hold under
    `batch_sharding` (rows are dimension 0), ascending. `jax.make_array_from_process_local_data`
    takes a process's rows in exactly this order (its index slices, sorted)."""
    indices = batch_sharding.addressable_devices_indices_map((global_batch_size, 1))
    rows: set[int] = set()
    for index in indices.values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return sorted(rows)


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (no collective when there
    is one process). A host collective: every process must call it at the same point."""
    import jax
    if jax.process_count() == 1:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray(len(data), np.int32))
    # Padded to a power of two so repeated calls reuse a few compiled gathers.
    width = 1 << max(int(lengths.max()) - 1, 1).bit_length()
    padded = np.zeros(width, np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths.tolist())]
