"""What the launchers in launch/ share: TPU slice shapes, input checks, and a runner that
prints every command (dry run) or runs it.

Nothing here imports JAX: launch/tpu_pod.py, launch/gke/render.py and launch/slurm.py run on
any machine with a jaxlm checkout (config checks need ml_collections) and gcloud, kubectl or
sbatch. Every check runs before the first command, so a bad input never costs a pod
allocation.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Callable, TextIO

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError, UserError
from jaxlm.parallel import topology as topology_lib
from jaxlm.train.validate import validate

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


class LaunchError(UserError, ValueError):
    """Bad launcher input; the message names the flag or file."""


class CommandFailed(RuntimeError):
    def __init__(self, argv: list[str], returncode: int):
        super().__init__(f"command failed with exit code {returncode}: {shlex.join(argv)}")
        self.argv = argv
        self.returncode = returncode


# ----------------------------------------------------------------------------- TPU shapes

# Per generation (jaxlm.parallel.topology's names): gcloud's accelerator-type prefix, the GKE node
# label cloud.google.com/gke-tpu-accelerator, and a TPU VM runtime image.
GCLOUD_PREFIX = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}
GKE_ACCELERATOR = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice",
                   "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
DEFAULT_RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
                   "v5e": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
CHIPS_PER_HOST = 4  # every multi-host slice has 4 chips per TPU VM host
# The largest single-host slices: 4 chips (2x2x1) for v4/v5p, 8 (2x4) for v5e/v6e.
MAX_SINGLE_HOST_CHIPS = {3: 4, 2: 8}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    topology: topology_lib.Topology

    @property
    def generation(self) -> str:
        return self.topology.chip.generation

    @property
    def chips(self) -> int:
        return self.topology.chips

    @property
    def devices(self) -> int:  # JAX devices: one per chip (v4/v5p megacore included)
        return self.topology.chips

    @property
    def hosts(self) -> int:
        if self.chips <= MAX_SINGLE_HOST_CHIPS[self.topology.chip.dims]:
            return 1
        return self.chips // CHIPS_PER_HOST

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def accelerator_type(self) -> str:
        """gcloud's name: v5p-128 (TensorCores for v4/v5p), v5litepod-16 (chips)."""
        return f"{GCLOUD_PREFIX[self.generation]}-{self.chips * self.topology.chip.cores_in_name}"

    @property
    def gke_accelerator(self) -> str:
        return GKE_ACCELERATOR[self.generation]

    @property
    def gke_topology(self) -> str:
        return "x".join(map(str, self.topology.shape))

    @property
    def default_runtime(self) -> str:
        return DEFAULT_RUNTIME[self.generation]


def tpu_slice(name: str, flag: str, topology: str | None = None) -> TpuSlice:
    """A slice from an accelerator type (`v5p-128`: 64 chips in 4x4x4 on 16 hosts), parsed
    by jaxlm.parallel.topology as `jaxlm compile` does; `topology` (`2x4x8`) overrides the chip grid
    and must hold the same number of chips."""
    try:
        parsed = topology_lib.parse(name)
    except topology_lib.TopologyError as e:
        raise LaunchError(f"{flag}: {e}") from None
    if parsed.chip.generation not in GCLOUD_PREFIX:
        raise LaunchError(f"{flag} {name!r}: no launcher settings for {parsed.chip.generation}")
    if topology is not None:
        try:
            grid = topology_lib.parse(f"{parsed.chip.generation}:{topology}")
        except topology_lib.TopologyError as e:
            raise LaunchError(f"--topology {topology!r}: {e}") from None
        if grid.chips != parsed.chips:
            raise LaunchError(f"--topology {topology!r} has {grid.chips} chips but {flag} "
                              f"{name} has {parsed.chips}")
        parsed = dataclasses.replace(parsed, shape=grid.shape)
    tpu = TpuSlice(parsed)
    if tpu.hosts > 1 and tpu.chips % CHIPS_PER_HOST:
        raise LaunchError(f"{flag} {name!r}: {tpu.chips} chips do not fill hosts of "
                          f"{CHIPS_PER_HOST} chips")
    return tpu


# ----------------------------------------------------------------------------- input checks

def check_name(name: str, flag: str, max_length: int) -> None:
    """Names become GCE/Kubernetes resource names: lowercase letters, digits and hyphens."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > max_length:
        raise LaunchError(f"{flag} {name!r}: use lowercase letters, digits and hyphens, start "
                          f"with a letter, end with a letter or digit, at most {max_length} "
                          f"characters")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.key=value` overrides (passed on to jaxlm train) from the rest."""
    rest, overrides = config_lib.split_overrides(argv)
    for item in overrides:
        if "=" not in item:
            raise LaunchError(f"override {item!r} must look like --config.key=value")
    return rest, overrides


def check_config(config: str, overrides: list[str], num_devices: int,
                 inside_repo: bool) -> str:
    """Loads the config with its overrides and validates it for `num_devices` devices (the
    target's, not this machine's), so a bad value fails here rather than on the pod.

    Returns the path to pass to `jaxlm train` on the target: relative to the repository root
    when the target gets a copy of the repository (`inside_repo`), else as given.
    """
    path = pathlib.Path(config)
    if not path.is_file():
        raise LaunchError(f"--config: config file not found: {config}")
    remote = config
    if inside_repo:
        try:
            remote = path.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:
            raise LaunchError(f"--config {config}: the file is outside the jaxlm source tree "
                              f"({REPO_ROOT}) that the workers get; put it under "
                              f"{REPO_ROOT / 'configs'}") from None
    try:
        validate(config_lib.load(path, overrides), num_devices)
    except ConfigError as e:
        raise LaunchError(f"{config} on {num_devices} devices: {e}") from None
    return remote


def check_workdir(workdir: str, processes: int, allow_shared_path: bool) -> None:
    """Several processes write one checkpoint, so their workdir must be one shared place."""
    if not workdir:
        raise LaunchError("--workdir is required")
    if processes > 1 and not workdir.startswith("gs://") and not (
            allow_shared_path and workdir.startswith("/")):
        where = "a gs:// path" + (" or an absolute path on a filesystem every host mounts"
                                  if allow_shared_path else "")
        raise LaunchError(f"--workdir {workdir!r}: {processes} processes write each "
                          f"checkpoint together, so the workdir must be {where}")


def train_argv(config: str, workdir: str, overrides: list[str],
               *extra: str) -> list[str]:
    """The `jaxlm train` arguments every process gets."""
    return ["train", "--config", config, "--workdir", workdir, *extra, *overrides]


# ----------------------------------------------------------------------------- running

class Runner:
    """Runs commands one after another, streaming their output; with `dry_run` prints each
    one (copy-pastable shell) and runs nothing. Comments start with '#'."""

    def __init__(self, dry_run: bool, out: TextIO | None = None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def comment(self, text: str) -> None:
        for line in text.splitlines():
            self._print(f"# {line}".rstrip())

    def run(self, argv: list[str], stdin_text: str | None = None) -> None:
        """Runs `argv`; a non-zero exit raises CommandFailed. `stdin_text` is fed on stdin
        (shown as a heredoc in a dry run)."""
        shown = shlex.join(argv)
        if stdin_text is not None:
            shown += " <<'EOF'\n" + stdin_text.rstrip("\n") + "\nEOF"
        self._print(shown if self.dry_run else f"+ {shown}")
        if self.dry_run:
            return
        result = subprocess.run(argv, input=stdin_text, text=True,
                                stdin=None if stdin_text is not None else subprocess.DEVNULL)
        if result.returncode:
            raise CommandFailed(argv, result.returncode)

    def query(self, argv: list[str], dry_run_answer: str | None) -> str | None:
        """Runs `argv` for its output: stripped stdout, or None when it fails (the resource
        does not exist). In a dry run prints it and returns `dry_run_answer`."""
        if self.dry_run:
            self._print(shlex.join(argv))
            return dry_run_answer
        self._print(f"+ {shlex.join(argv)}")
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return result.stdout.strip() if result.returncode == 0 else None


def main_guard(prog: str, body: Callable[[], int]) -> int:
    """Runs a launcher's body: bad input -> one line and exit 2; a failed command -> its
    exit code."""
    try:
        return body()
    except LaunchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.returncode
    except FileNotFoundError as e:  # gcloud/kubectl/sbatch not installed
        print(f"{prog}: {e.filename or e}: not found on PATH", file=sys.stderr)
        return 127
