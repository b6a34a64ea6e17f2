"""`jaxlm compile`: the real train step, compiled ahead of time for a TPU topology on any host.

    jaxlm compile --config configs/llama3_8b.py [--topology v5p-128] [--mfu 0.5]

The step is the one `jaxlm train` (or `jaxlm finetune`) runs: the config's task builds it
(same state layout, shardings, donation, jit), lowered for the compile-only devices libtpu
describes for the topology (see jaxlm.parallel.topology) and compiled by the TPU compiler.
No TPU and no network are needed, only the `tpu` extra.

Per-chip memory is XLA's own buffer assignment: arguments (this chip's shard of the train
state and of the batch), outputs (the new state and the metrics), minus what is aliased (the
donated state's buffers are reused for the new one), plus temporaries (activations, gradients,
collectives' buffers) and the program's code; the sum is compared with the HBM the compiler
lets a program use. A step that does not fit stops the TPU compiler early with the total it
needed; the report then gives that total, the arguments (from the state layout) and the FLOPs,
and `run` returns DOES_NOT_FIT_EXIT_CODE.

FLOPs per step: the task's analytic model FLOPs (jaxlm.model.counts; they set the step
time at a given MFU) and XLA's cost analysis of the compiled per-chip program times the chips.
XLA counts a while loop's body once, so with model.scan_layers the layer stack appears as one
layer there; with scan_layers=False it counts every executed FLOP (remat recompute included).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import topology as topology_lib
from jaxlm.parallel.topology import GiB
from jaxlm.train import hlo_cost
from jaxlm.train.task import Task

DOES_NOT_FIT_EXIT_CODE = 1

# The TPU compiler's two out-of-memory messages (figures in binary units: "95.74G").
_OOM_PATTERNS = (
    re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
               r"\(([\d.]+)([KMGT]?)\)"),
    re.compile(r"Requires ([\d.]+)([KMGT]?)i?B?, has ([\d.]+)([KMGT]?)i?B? available"),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclasses.dataclass(frozen=True)
class MemoryFigures:
    """Bytes per chip, from XLA's memory analysis of the compiled step."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: topology_lib.Topology
    num_slices: int
    mesh_shape: dict[str, int]  # the mesh's axis sizes (DCN factors included)
    params: int
    global_batch: int
    seq_len: int
    argument_bytes: int  # per chip: train state and batch shards, from their shardings
    memory: MemoryFigures | None  # None when the compiler stopped for lack of memory
    required_bytes: int  # per chip: memory.total, or the compiler's figure when it stopped
    usable_hbm_bytes: int  # per chip, as the compiler counts it
    model_flops: float  # per step, analytic (the task's flops_per_token)
    xla_flops: float | None  # per step, all chips, XLA's cost analysis (None if not compiled)
    scan_layers: bool
    mfu: float
    compile_s: float
    attention: str = "xla"  # the backend that runs (model.attention resolved for TPU)
    # With analyse=True (jaxlm plan): XLA's per-chip bytes accessed, the compiled text's
    # trip-count-weighted cost, and the mesh's devices (logical ids are their flat order).
    xla_bytes: float | None = None
    hlo: hlo_cost.HloCost | None = None
    mesh_devices: np.ndarray | None = None

    @property
    def chips(self) -> int:
        return self.topology.chips * self.num_slices

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.required_bytes <= self.usable_hbm_bytes

    @property
    def step_time_s(self) -> float:
        """Seconds per step if the chips reach `mfu` of their peak on the model's FLOPs."""
        return self.model_flops / (self.mfu * self.topology.chip.peak_flops * self.chips)


def memory_of(compiled: jax.stages.Compiled) -> MemoryFigures:
    """What XLA's memory analysis says one device's program holds at its peak."""
    stats = compiled.memory_analysis()
    return MemoryFigures(
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
        generated_code=stats.generated_code_size_in_bytes)


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def parse_oom(message: str) -> tuple[int, int] | None:
    """(required, available) bytes from a TPU compiler out-of-memory message, else None."""
    for pattern in _OOM_PATTERNS:
        match = pattern.search(message)
        if match:
            need, need_unit, have, have_unit = match.groups()
            return (int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit]))
    return None


def compile_for_topology(make_task: Callable[[int], Task], cfg: ml_collections.ConfigDict,
                         topology_name: str, mfu: float = 0.5, *,
                         analyse: bool = False) -> CompileReport:
    """Compiles the train step of the task `make_task(num_devices)` builds from `cfg` for
    `mesh.dcn_data x mesh.dcn_fsdp` slices of `topology_name`. Raises TopologyError /
    ConfigError before compiling anything. `analyse`: also read the compiled program's
    text (jaxlm.train.hlo_cost) for the report's xla_bytes, hlo and mesh_devices.

    This host's own computations (none are needed to build the state layout) run on its
    default backend: on a host with libtpu but no TPU, set JAX_PLATFORMS=cpu (`jaxlm
    compile` does)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be in (0, 1]")
    topology = topology_lib.parse(topology_name)
    slices = config_lib.num_slices(cfg.mesh)
    task = make_task(topology.chips * slices)
    cfg = task.cfg
    devices = topology_lib.compile_only_devices(topology, slices)

    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    batch, seq_len = cfg.data.global_batch_size, cfg.data.seq_len
    # Built outside the mesh context: optax runs a few eager ops to find its state's layout,
    # and they must run on this host, not on the compile-only devices. Tracing (in lower)
    # applies the activation constraints.
    task.build(mesh)
    start = time.perf_counter()
    with mesh_lib.use(mesh):
        lowered = task.lower()
    memory, xla_flops, usable = None, None, topology.chip.usable_hbm_bytes
    xla_bytes, hlo = None, None
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise
        required, usable = oom
    else:
        memory = memory_of(compiled)
        required = memory.total
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:  # one chip's program (SPMD): times the chips
            xla_flops = float(cost["flops"]) * len(devices)
        if analyse:
            xla_bytes = float((cost or {}).get("bytes accessed", 0.0))
            hlo = hlo_cost.analyse(compiled.as_text())
        del compiled
    compile_s = time.perf_counter() - start
    return CompileReport(
        topology=topology, num_slices=slices, mesh_shape=dict(mesh.shape),
        params=zoo.param_count(cfg.model), global_batch=batch, seq_len=seq_len,
        argument_bytes=shard_bytes((task.spec.abstract, task.spec.frozen_abstract,
                                    task.abstract_batch())),
        memory=memory, required_bytes=required, usable_hbm_bytes=usable,
        model_flops=task.flops_per_token() * batch * seq_len,
        xla_flops=xla_flops, scan_layers=cfg.model.scan_layers, mfu=mfu, compile_s=compile_s,
        attention=zoo.attention_backend(cfg.model, "tpu", seq_len),
        xla_bytes=xla_bytes, hlo=hlo, mesh_devices=mesh.devices if analyse else None)


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f} GiB"


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{1e3 * s:.1f} ms"


def format_report(r: CompileReport) -> str:
    t, m = r.topology, r.memory
    slices = f"{r.num_slices} slices of " if r.num_slices > 1 else ""
    usable = r.usable_hbm_bytes
    over = r.required_bytes - usable
    verdict = f"fits, {-over / GiB:.2f} GiB to spare" if r.fits else \
        f"DOES NOT FIT, {over / GiB:.2f} GiB over"
    lines = [
        f"topology        {slices}{t.name}: {r.chips} chip{'s' * (r.chips > 1)} of "
        f"{t.chip.device_kind} "
        f"({t.libtpu_name}), {t.chip.hbm_bytes / GiB:.0f} GiB HBM each "
        f"({usable / GiB:.2f} GiB usable)",
        f"mesh            {' x '.join(f'{k} {v}' for k, v in r.mesh_shape.items())}",
        f"model           {r.params:,} parameters; batch {r.global_batch} x {r.seq_len} = "
        f"{r.global_batch * r.seq_len:,} tokens per step",
        f"attention       {r.attention}" + (" (Pallas splash kernel)" if r.attention == "splash"
                                            else ""),
        f"compiled in     {r.compile_s:.1f} s" if m else
        f"compiler        stopped after {r.compile_s:.1f} s: out of HBM",
        "per-chip memory" + (" (XLA buffer assignment)" if m else ""),
    ]
    if m:
        lines += [
            f"  arguments     {_gib(m.arguments)}   train state and batch shards",
            f"  outputs       {_gib(m.outputs)}   new state and metrics",
            f"  aliased       {_gib(-m.aliased)}   donated state buffers reused for the new state",
            f"  temporaries   {_gib(m.temporaries)}   activations, gradients, collectives",
            f"  generated code{_gib(m.generated_code)}",
        ]
    else:
        lines.append(f"  arguments     {_gib(r.argument_bytes)}   train state and batch shards "
                     "(from their shardings)")
    lines.append(f"  total         {_gib(r.required_bytes)}   of {usable / GiB:.2f} GiB "
                 f"({100 * r.required_bytes / usable:.0f}%): {verdict}")
    lines += [
        "FLOPs per step",
        f"  model          {r.model_flops:.3e}   analytic: 6 x matmul parameters + attention "
        "(causal in decoders) per token (README: FLOPs)",
    ]
    if r.xla_flops is not None:
        note = ("the scanned layer loop's body counted once" if r.scan_layers else
                "every executed FLOP, remat recompute included")
        if r.attention == "splash":
            note += "; the splash kernel's not at all"
        lines.append(f"  XLA            {r.xla_flops:.3e}   cost analysis x {r.chips} chips; "
                     f"{note}")
    peak = t.chip.peak_flops
    lines.append(f"step time       {_seconds(r.step_time_s)} at {100 * r.mfu:.0f}% MFU "
                 f"({peak / 1e12:.0f} TFLOP/s bf16 peak per chip), "
                 f"{r.global_batch * r.seq_len / r.step_time_s / r.chips:,.0f} tokens/s per chip")
    return "\n".join(lines)


def topology_of(topology_name: str, cfg: ml_collections.ConfigDict) -> topology_lib.Topology:
    """The slice a verb compiles for: `topology_name` (--topology), else config.mesh.topology;
    ConfigError naming which one is wrong."""
    name = topology_name or cfg.mesh.topology
    if not name:
        raise ConfigError("config.mesh.topology: empty; name the TPU slice to compile for "
                          "(--topology v5p-128 or the config key)")
    try:
        return topology_lib.parse(name)
    except topology_lib.TopologyError as e:
        where = "--topology" if topology_name else "config.mesh.topology"
        raise ConfigError(f"{where}: {e}") from None


def run(make_task: Callable[[int], Task], cfg: ml_collections.ConfigDict, topology_name: str,
        mfu: float, out: Callable[[str], None] = print) -> int:
    """The `compile` verb: prints the report; DOES_NOT_FIT_EXIT_CODE when over HBM."""
    topology = topology_of(topology_name, cfg)
    report = compile_for_topology(make_task, cfg, topology.name, mfu)
    out(format_report(report))
    return 0 if report.fits else DOES_NOT_FIT_EXIT_CODE
