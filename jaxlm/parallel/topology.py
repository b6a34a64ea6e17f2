"""The accelerator chip table (HBM and peak FLOP/s of every chip jaxlm knows), TPU slice
names ("v5p-128", "v5e-16", or an explicit "v5p:4x4x4") and the compile-only devices
libtpu builds for a slice on any host (no TPU, no network).

Names follow Cloud TPU accelerator types. v4 and v5p names count TensorCores, two per chip
("megacore": JAX sees one device per chip), so v5p-128 is 64 chips in a 4x4x4 cube; v5e
and v6e names count chips, one TensorCore each (v5e-16 is 16 chips in a 4x4 grid; v5litepod-N
is accepted for v5e-N). Slices of 64 chips or more are whole 4x4x4 cubes joined as a 3-D torus
(wrap-around links on every axis), arranged as the most cubic shape (v5p-1024 = 8x8x8).

HBM per chip: the Cloud TPU documentation (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e)
gives v4 32, v5e 16, v5p 95, v6e 32 "GB", in binary units; what a program may use is a little
different, and is what the TPU compiler checks a step against: its out-of-memory message
gives the available HBM as v4 30.75, v5e 15.75, v5p 95.74, v6e 31.25 GiB (libtpu 0.0.42).
Peak FLOP/s are dense bfloat16 per chip from the vendors' data sheets (the same pages for
TPUs; NVIDIA's for GPUs), and beside them the dense int8 and fp8 peaks where a chip runs
those faster (Cloud TPU pages: int8 394 TOPS v5e, 918 v5p, 1,836 v6e, v4's 275 the same as
bf16, no fp8 unit on any of them; NVIDIA: A100 624 int8, H100/H200 1,979 int8 and fp8).

Bandwidths (TPUs; what `jaxlm plan`'s roofline divides by): HBM per chip from the same Cloud
pages (v5p 2,765, v5e 819, v6e 1,640 GB/s) and v4's 1.2e12 from "How to Scale Your Model"
(jax-ml.github.io/scaling-book/tpus, part 2); inter-chip links one way, per link, from the
scaling book (4.5e10 v4 and v5e, 9e10 v5p and v6e; a ring with wrap-around uses both
directions); data-center network per chip: the scaling book's 6.25e9 (v4, v5p; Cloud's v5p
page: 50 Gbps per chip), 3.125e9 (v5e) and 1.25e10 (v6e) bytes/s.

Owns the only table of chip facts: MFU (jaxlm.train.metrics), `jaxlm compile` and the
launchers read it. Importing this module imports no JAX (the launchers run without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from typing import Any, Iterator

from jaxlm.errors import UserError

GiB = 1024**3


class TopologyError(UserError, ValueError):
    """A topology name that is not a TPU slice this module knows."""


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # "v5p", "h100"
    device_kinds: tuple[str, ...]  # what JAX reports for one device; the first for new devices
    peak_flops: float  # dense bf16 FLOP/s per chip (data sheet)
    hbm_bytes: int  # documented capacity
    usable_hbm_bytes: int = 0  # TPUs: what the TPU compiler lets one program use
    cores_in_name: int = 1  # TPUs: TensorCores per chip counted by the accelerator-type name
    dims: int = 0  # TPUs: 3 (3-D torus of 4x4x4 cubes) or 2 (2-D grid); 0: not a TPU slice
    hbm_bw: float = 0.0  # TPUs: HBM bytes/s
    ici_link_bw: float = 0.0  # TPUs: bytes/s one way over one inter-chip link
    dcn_bw: float = 0.0  # TPUs: data-center network bytes/s per chip
    int8_flops: float = 0.0  # dense int8 ops/s per chip; 0: no faster than bf16
    fp8_flops: float = 0.0  # dense fp8 FLOP/s per chip; 0: no faster than bf16

    def peak_of(self, kind: str) -> float:
        """Peak per chip of matmuls on `kind` operands ("int8", "fp8"; else bf16)."""
        return {"int8": self.int8_flops, "fp8": self.fp8_flops}.get(kind) or self.peak_flops

    @property
    def device_kind(self) -> str:
        return self.device_kinds[0]


CHIPS = {
    "v4": Chip("v4", ("TPU v4",), 275e12, 32 * GiB, int(30.75 * GiB), 2, 3,
               1.2e12, 4.5e10, 6.25e9),
    "v5p": Chip("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * GiB, int(95.74 * GiB), 2, 3,
                2.765e12, 9e10, 6.25e9, int8_flops=918e12),
    "v5e": Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, int(15.75 * GiB), 1, 2,
                8.19e11, 4.5e10, 3.125e9, int8_flops=394e12),
    "v6e": Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, int(31.25 * GiB), 1, 2,
                1.64e12, 9e10, 1.25e10, int8_flops=1836e12),
    "a100": Chip("a100", ("NVIDIA A100",), 312e12, 80 * GiB, int8_flops=624e12),
    "h100": Chip("h100", ("NVIDIA H100",), 989e12, 80 * GiB, int8_flops=1979e12,
                 fp8_flops=1979e12),
    "h200": Chip("h200", ("NVIDIA H200",), 989e12, 141 * 10**9, int8_flops=1979e12,
                 fp8_flops=1979e12),
}
TPU_GENERATIONS = tuple(name for name, chip in CHIPS.items() if chip.dims)


def chip_of(device_kind: str) -> Chip | None:
    """The chip whose device kind `device_kind` starts with (the longest match), or None."""
    kinds = sorted(((kind, chip) for chip in CHIPS.values() for kind in chip.device_kinds),
                   key=lambda kc: -len(kc[0]))
    return next((chip for kind, chip in kinds if device_kind.startswith(kind)), None)


ALIASES = {"v5litepod": "v5e"}

# Slices smaller than one cube (3-D) and every 2-D slice shape Cloud TPU offers, by chips.
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_USAGE = ("a TPU slice such as v5p-128, v4-8, v5e-16, v6e-256 (Cloud TPU accelerator type; "
          "v4/v5p count 2 TensorCores per chip) or an explicit chip grid such as v5p:4x4x8; "
          f"generations: {', '.join(TPU_GENERATIONS)}")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    chip: Chip
    shape: tuple[int, ...]  # chips along each axis of one slice

    @property
    def chips(self) -> int:
        """Chips (= JAX devices) in one slice."""
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links per axis: whole cubes (3-D); full 16-chip rows (2-D)."""
        if self.chip.dims == 3:
            return (self.chips >= 64,) * 3
        return (self.shape[0] == 16, self.shape[1] == 16, False)


def _cube_shape(chips: int) -> tuple[int, int, int]:
    """The most cubic a x b x c (a <= b <= c, multiples of 4) holding `chips` chips."""
    cubes = chips // 64
    best = None
    for a in range(1, cubes + 1):
        for b in range(a, cubes // a + 1):
            c, rest = divmod(cubes, a * b)
            if rest or c < b:
                continue
            if best is None or (c, b) < (best[2], best[1]):
                best = (a, b, c)
    return tuple(4 * n for n in best)


def parse(name: str) -> Topology:
    """`Topology` of a slice name; TopologyError (naming the accepted forms) otherwise."""
    text = name.strip().lower()
    explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    named = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not (explicit or named):
        raise TopologyError(f"{name!r} is not {_USAGE}")
    generation = (explicit or named).group(1)
    generation = ALIASES.get(generation, generation)
    if generation not in TPU_GENERATIONS:
        raise TopologyError(f"{name!r}: unknown TPU generation {generation!r}; expected {_USAGE}")
    chip = CHIPS[generation]
    if explicit:
        shape = tuple(int(n) for n in explicit.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise TopologyError(f"{name!r}: {generation} slices are {chip.dims}-D chip grids "
                                f"such as {generation}:{'x'.join(['2'] * chip.dims)}")
        return Topology(name, chip, shape)
    count = int(named.group(2))
    if count % chip.cores_in_name:
        raise TopologyError(f"{name!r}: {generation} names count {chip.cores_in_name} "
                            f"TensorCores per chip, so the number must be even")
    chips = count // chip.cores_in_name
    if chip.dims == 2:
        if chips not in _SHAPES_2D:
            raise TopologyError(f"{name!r}: {generation} slices have "
                                f"{', '.join(map(str, _SHAPES_2D))} chips")
        return Topology(name, chip, _SHAPES_2D[chips])
    if chips in _SMALL_3D:
        return Topology(name, chip, _SMALL_3D[chips])
    if chips < 64 or chips % 64:
        sizes = [c * chip.cores_in_name for c in _SMALL_3D]
        raise TopologyError(f"{name!r}: {generation} slices are {generation}-"
                            f"{', -'.join(map(str, sizes))} or whole 4x4x4 cubes "
                            f"({generation}-{64 * chip.cores_in_name}, "
                            f"-{128 * chip.cores_in_name}, ...)")
    return Topology(name, chip, _cube_shape(chips))


def compile_only_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """The devices of `num_slices` such slices, for lowering and compiling only.

    Needs libtpu (the `tpu` extra) but no TPU. Devices of a multi-slice topology carry a
    `slice_index`. Raises TopologyError when libtpu is missing or refuses the topology."""
    from jax.experimental import topologies
    bounds = (1, 1, 1) if topology.chips == 1 else (2, 2, 1)
    try:
        with _libtpu_off_tpu_environment(topology):
            desc = topologies.get_topology_desc(
                topology.libtpu_name, "tpu",
                chip_config_name="megacore" if topology.chip.cores_in_name == 2 else "default",
                chips_per_host_bounds=bounds, wrap=topology.wrap, num_slices=num_slices)
    except RuntimeError as e:  # JaxRuntimeError is a RuntimeError
        if "TPU support not installed" in str(e):
            raise TopologyError("compiling for a TPU topology needs libtpu: "
                                "pip install 'jaxlm[tpu]'") from None
        raise TopologyError(f"{topology.name!r}: libtpu refused topology "
                            f"{topology.libtpu_name}: {e}") from None
    devices = list(desc.devices)
    expected = topology.chips * num_slices
    if len(devices) != expected or devices[0].device_kind != topology.chip.device_kind:
        raise TopologyError(f"{topology.name!r}: libtpu built {len(devices)} "
                            f"{devices[0].device_kind!r} devices, expected {expected} "
                            f"{topology.chip.device_kind!r}")
    return devices


@contextlib.contextmanager
def _libtpu_off_tpu_environment(topology: Topology) -> Iterator[None]:
    """What libtpu reads when it starts, as on a TPU VM, for the time it starts here: no query
    of the GCE metadata server (network), no wait for the machine-wide lock file another JAX
    process on this host may hold, and a worker description, so it logs no warnings."""
    values = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
              "TPU_ACCELERATOR_TYPE": f"{topology.chip.generation}-"
                                      f"{topology.chips * topology.chip.cores_in_name}",
              "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({k: v for k, v in values.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
