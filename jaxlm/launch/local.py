"""`jaxlm launch local`: rehearse a multi-host run on this machine.

    jaxlm launch local --processes 2 --devices-per-process 4 -- train --config configs/tiny.py

starts N copies of `python -m jaxlm.cli <command>`, each with M simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=M), joined by JAX's coordination service
on a free loopback port, with cross-process collectives over gloo: the code path of a
pod, where every host runs the same command. Each line a process prints is shown as
"[p<i>] ...". The launcher's own lines start with "[launch]".

Exit code: the first non-zero exit code of a process (a process killed by signal S counts
as 128 + S), else 0. When a process fails, the others stop by themselves within JAX's
heartbeat timeout (jaxlm.parallel.distributed); any still running `--grace` seconds after the first
failure is killed, so nothing hangs. SIGINT/SIGTERM to the launcher is passed on to every
process (a preemption: they agree on a step, save it and exit 75); a second one kills them.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

from jaxlm import errors
from jaxlm.parallel import distributed

DEFAULT_GRACE_S = 40.0  # > JAX's heartbeat timeout: the processes get to stop by themselves


def free_port() -> int:
    """A TCP port free on the loopback interface now (the coordinator binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], *, process_id: int, num_processes: int,
              devices_per_process: int, coordinator: str) -> dict[str, str]:
    """`base` plus what makes a process one of the rehearsal's (read by jaxlm.parallel.distributed)."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COORDINATOR_BIND_ADDRESS"] = coordinator  # loopback only, not every interface
    env[distributed.ENV_COORDINATOR] = coordinator
    env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
    env[distributed.ENV_PROCESS_ID] = str(process_id)
    env[distributed.ENV_CPU_COLLECTIVES] = "gloo"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shell_code(code: int) -> int:
    """A process's return code as a shell reports it (signal S: 128 + S)."""
    return 128 - code if code < 0 else code


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the launcher dies, so no rehearsal process is orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(index: int, stream, out: TextIO, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        with lock:
            out.write(f"[p{index}] {line}\n")
            out.flush()
    stream.close()


def launch(command: Sequence[str], processes: int, devices_per_process: int, *,
           grace_s: float = DEFAULT_GRACE_S, out: TextIO | None = None,
           env: dict[str, str] | None = None) -> int:
    """Runs `command` as `processes` processes of `devices_per_process` CPU devices each and
    returns the first non-zero exit code (as a shell reports it), else 0."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"need at least one process and one device per process, got "
                         f"{processes} x {devices_per_process}")
    out = out or sys.stdout
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            out.write(f"[launch] {message}\n")
            out.flush()

    coordinator = f"127.0.0.1:{free_port()}"
    base = dict(os.environ if env is None else env)
    children = []
    for i in range(processes):
        children.append(subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=child_env(base, process_id=i, num_processes=processes,
                          devices_per_process=devices_per_process, coordinator=coordinator),
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only
            preexec_fn=_die_with_parent))
    say(f"{processes} processes x {devices_per_process} CPU devices, coordinator {coordinator}, "
        f"gloo collectives: {' '.join(command)}")
    for i, child in enumerate(children):
        say(f"process {i}: pid {child.pid}")
    # Forwarding is in place before any child's output is passed on: whoever reads a
    # child's "ready" may signal the launcher at once.
    signals_seen = []

    def forward(signum, frame) -> None:
        signals_seen.append(signum)
        name = signal.Signals(signum).name
        live = [c for c in children if c.poll() is None]
        if len(signals_seen) == 1:
            say(f"{name}: passing it on to every process (they save a checkpoint and exit 75; "
                f"send it again to kill them)")
            for c in live:
                c.send_signal(signum)
        else:
            say(f"second {name}: killing every process")
            for c in live:
                c.kill()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    pumps = [threading.Thread(target=_pump, args=(i, c.stdout, out, lock), daemon=True)
             for i, c in enumerate(children)]
    for pump in pumps:
        pump.start()

    codes: list[int | None] = [None] * processes
    order: list[int] = []  # process indices in the order they exited
    failed_at: tuple[int, float] | None = None  # the first process to exit non-zero, when
    backstop_used = False
    try:
        while None in codes:
            for i, child in enumerate(children):
                if codes[i] is not None or child.poll() is None:
                    continue
                codes[i] = child.returncode
                order.append(i)
                now = time.monotonic()
                if failed_at is not None:
                    say(f"process {i} exited with {errors.describe(codes[i])}, "
                        f"{now - failed_at[1]:.1f} s after process {failed_at[0]}")
                elif codes[i] != 0 and None in codes:
                    failed_at = (i, now)
                    say(f"process {i} exited with {errors.describe(codes[i])}" + (
                        "" if codes[i] == errors.PREEMPTED else "; the others should stop within the "
                        f"heartbeat timeout, and are killed after {grace_s:.0f} s"))
                else:
                    say(f"process {i} exited with {errors.describe(codes[i])}")
            if not backstop_used and failed_at and time.monotonic() - failed_at[1] > grace_s:
                backstop_used = True
                for i, child in enumerate(children):
                    if codes[i] is None and child.poll() is None:
                        say(f"process {i} still running {grace_s:.0f} s after process "
                            f"{failed_at[0]} failed: killing it")
                        child.kill()
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for pump in pumps:
            pump.join(timeout=5)
    say("exit codes: " + ", ".join(f"p{i}={codes[i]}" for i in range(processes)))
    return next((shell_code(codes[i]) for i in order if codes[i] != 0), 0)


USAGE = "jaxlm launch local --processes N --devices-per-process M [--grace S] -- COMMAND"
LOCAL_HELP = "N processes of M simulated CPU devices, gloo on loopback"


def add_local_arguments(local: argparse.ArgumentParser) -> None:
    """The options of `jaxlm launch local` (also in `jaxlm --help`'s parser tree)."""
    local.add_argument("--processes", type=int, required=True,
                       help="processes to start (required), each running COMMAND")
    local.add_argument("--devices-per-process", type=int, required=True,
                       help="simulated CPU devices of each process (required)")
    local.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                       help="seconds after a process fails before the others are killed "
                            "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxlm launch", description=__doc__, usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="COMMAND, after `--`, is a whole jaxlm command line, run by every process, e.g.\n"
               "  train --config configs/tiny.py --config.train.steps=100")
    where = parser.add_subparsers(dest="where", required=True)
    local = where.add_parser("local", help=LOCAL_HELP, description=__doc__, usage=USAGE,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=parser.epilog)
    add_local_arguments(local)
    return parser


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if "--" not in argv:
        build_parser().parse_args(argv)  # --help prints the usage and exits 0
        build_parser().print_usage(sys.stderr)
        print("jaxlm launch: the jaxlm command to run goes after `--`", file=sys.stderr)
        return 2
    split = argv.index("--")
    args, command = build_parser().parse_args(argv[:split]), argv[split + 1:]
    if not command:
        print("jaxlm launch: nothing after `--` (e.g. -- train --config configs/tiny.py)",
              file=sys.stderr)
        return 2
    if args.processes < 1 or args.devices_per_process < 1:
        print("jaxlm launch: --processes and --devices-per-process must be >= 1", file=sys.stderr)
        return 2
    return launch([sys.executable, "-m", "jaxlm.cli", *command], args.processes,
                  args.devices_per_process, grace_s=args.grace)
