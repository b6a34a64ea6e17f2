"""`jaxlm plan`: which mesh, remat policy, gradient accumulation and attention backend (and,
when asked, quantized training) to train a config with on a TPU slice, answered by compiling
candidates ahead of time (as `jaxlm compile` does, on any host) and ranking those that fit
by a roofline estimate.

    jaxlm plan --config configs/llama3_8b.py [--topology v5p-128] [--budget 840]

Search (every rule below is what keeps the llama3_8b / v5p-128 search within 15 minutes on
a 2-core host; a fitting 8B compile takes about 30 s, one that runs out of HBM 1-3 s):
1. Meshes: every (data, fsdp, context, tensor, expert) whose product is the slice's chips,
   kept only if the chip grid can be cut into those axes (jaxlm.parallel.mesh) and the
   config validates on it (heads, kv heads, d_ff and vocabulary divisible by tensor; batch
   rows by data x fsdp x expert; context parallelism's sequence rules; an expert axis only
   for family moe, dividing its experts). Several slices: dcn_data or
   dcn_fsdp across them (tensor and context never cross the data-center network).
2. Context parallelism only when the batch has fewer rows than there are chips: with at
   least one row per chip it only adds K/V gathers.
3. The config's own plan is compiled first; then the meshes by fewest tensor and context
   shards, then fewest data shards (FSDP first).
4. Remat from most to least memory saved (full, save_matmuls, none). For each, the smallest
   gradient accumulation that fits: a compile that runs out of HBM reports how much it
   needed, the activations part shrinks with the microbatch, so the next try is the smallest
   legal accumulation that would fit by that figure (then confirmed by compiling). Memory
   only grows as remat drops, so the next policy starts from the accumulation the last one
   needed, and a mesh whose state does not fit even with full remat is left at once.
   Larger accumulation than the smallest that fits is not compiled: it only repeats the
   FSDP gathers per microbatch.
5. Attention: the config's backend as it resolves on TPU (splash by default); `xla` is
   tried on the best plan only (with the accumulation it needs to fit), for comparison: it
   does the same matmuls plus the materialised score matrices, so it cannot win elsewhere.
6. Quantized training, only when --search names `quant` (it changes the model's numerics):
   the 8-bit matmul types the chip runs faster than bf16 (int8 on v5e, v5p and v6e; none
   on v4), and no quantization if the config has some, are compiled on the best plan (with
   the accumulation each needs to fit).
7. A time budget (--budget seconds): a compile starts only while 1.2 x the slowest compile
   so far still fits in what is left; what was not tried is counted in the output.

Estimate (per chip, seconds per step), from the compiled program:
- flops: XLA's cost analysis with every loop body counted as often as it runs
  (jaxlm.train.hlo_cost), plus splash attention's FLOPs, which XLA cannot see inside the
  kernel (analytic: the causal half of the score and value matmuls forward, backward with
  the probabilities recomputed by both of splash's backward kernels, forward again under
  remat), over the chip's bf16 peak; the matmuls on int8 (fp8) operands over the chip's
  int8 (fp8) peak;
- hbm: XLA's bytes accessed, loop-weighted by the ratio of the text's traffic counted as
  the loops run to counted once (within 20% of XLA's count of the unrolled program in the
  tests: the text does not show XLA's per-operand view), over HBM bandwidth;
- ici: bytes each chip moves in the collectives over the data and fsdp axes (parameter
  gathers, gradient reductions; ring costs in jaxlm.train.hlo_cost.bytes_moved) over the
  links the group spans (one per physical axis, both directions when the axis wraps);
- exposed: the same for collectives over the tensor, context and expert axes (activations);
- dcn: transfers between slices over the chip's data-center network bandwidth.
step = max(flops, hbm, ici, dcn) + exposed: XLA overlaps parameter-shaped collectives with
compute; activation collectives sit on the critical path. est. MFU = model FLOPs per chip
/ (step x peak). An estimate to rank plans by, not a measurement.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable

import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm.config.schema import QUANT_TYPES
from jaxlm.errors import ConfigError
from jaxlm.model import counts, zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import topology as topology_lib
from jaxlm.parallel.topology import GiB
from jaxlm.train import aot, hlo_cost
from jaxlm.train.task import Task

REMATS = ("full", "save_matmuls", "none")  # most memory saved first
DIMENSIONS = ("mesh", "remat", "accum", "attention", "quant")  # what --search may vary
DEFAULT_SEARCH = "mesh,remat,accum,attention"  # quant changes numerics: only when asked
ACTIVATION_AXES = ("tensor", "context", "expert")  # collectives on these are not overlapped
STATE_PER_ARGUMENTS = 4 / 3  # float32 gradients beside parameters and two Adam moments
HEADROOM = 0.95  # the accumulation jump aims at this share of usable HBM


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[int, ...]  # ICI sizes of config.MESH_AXES
    dcn: tuple[int, int]  # (dcn_data, dcn_fsdp)
    remat: str
    accum: int
    attention: str
    quant: str  # quant.training

    def overrides(self) -> list[str]:
        keys = dict(zip(config_lib.MESH_AXES, self.mesh))
        keys.update(dcn_data=self.dcn[0], dcn_fsdp=self.dcn[1])
        return ([f"--config.mesh.{k}={v}" for k, v in keys.items()] +
                [f"--config.model.remat={self.remat}",
                 f"--config.optim.grad_accum_steps={self.accum}",
                 f"--config.model.attention={self.attention}",
                 f"--config.quant.training={self.quant}"] +
                (["--config.quant.backward=none"] if self.quant == "none" else []))

    def apply(self, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.mesh.update(dict(zip(config_lib.MESH_AXES, self.mesh)),
                        dcn_data=self.dcn[0], dcn_fsdp=self.dcn[1])
        cfg.model.remat = self.remat
        cfg.model.attention = self.attention
        cfg.optim.grad_accum_steps = self.accum
        cfg.quant.training = self.quant
        if self.quant == "none":
            cfg.quant.backward = "none"  # it quantizes the gradients of quantized matmuls
        return cfg

    def label(self) -> str:
        mesh = "x".join(map(str, self.mesh))
        dcn = f" dcn {self.dcn[0]}x{self.dcn[1]}" if max(self.dcn) > 1 else ""
        return f"{mesh}{dcn}"


@dataclasses.dataclass(frozen=True)
class Estimate:
    flops_s: float
    hbm_s: float
    ici_s: float
    exposed_s: float
    dcn_s: float
    model_flops_per_chip: float
    peak: float

    @property
    def step_s(self) -> float:
        return max(self.flops_s, self.hbm_s, self.ici_s, self.dcn_s) + self.exposed_s

    @property
    def mfu(self) -> float:
        return self.model_flops_per_chip / (self.step_s * self.peak)


@dataclasses.dataclass(frozen=True)
class Outcome:
    plan: Plan
    required_bytes: int
    usable_bytes: int
    compile_s: float
    estimate: Estimate | None  # None: does not fit
    attention: str  # the backend that ran (plan.attention resolved for TPU)
    state_bytes: float  # per chip: train state and float32 gradients
    own: bool = False  # the config's own plan


def splash_flops_per_chip(cfg: ml_collections.ConfigDict, chips: int) -> float:
    """What the splash kernels execute per step and chip, which XLA does not count: the
    model's attention FLOPs (jaxlm.model.counts: forward 2 units, backward 4) with splash's
    backward recomputing the scores in both of its kernels (7 units) and the forward again
    under remat (2 more)."""
    m, d = cfg.model, cfg.data
    causal = zoo.family(m.family).kind == "decoder"
    units = 2 + 7 + (2 if m.remat != "none" else 0)
    tokens = d.global_batch_size * d.seq_len
    per_token = counts.attention_flops_per_token(m, d.seq_len, causal=causal)
    return per_token * units / 6 * tokens / chips


def estimate(report: aot.CompileReport, cfg: ml_collections.ConfigDict) -> Estimate:
    """The roofline of a compiled step (module docstring), per chip."""
    topology, chip, hlo = report.topology, report.topology.chip, report.hlo
    flops, hbm_bytes = hlo.corrected(report.xla_flops / report.chips, report.xla_bytes or 0.0)
    if report.attention == "splash":
        flops += splash_flops_per_chip(cfg, report.chips)
    flops_s = ((flops - sum(hlo.low_precision.values())) / chip.peak_flops
               + sum(f / chip.peak_of(kind) for kind, f in hlo.low_precision.items()))
    devices = report.mesh_devices
    first_slice = getattr(devices.flat[0], "slice_index", 0)
    # A slice's program names its own devices: their flat positions in the mesh order.
    local = [d for d in devices.flat if getattr(d, "slice_index", 0) == first_slice]
    dcn_of = config_lib.DCN_KEYS
    ici_shape = tuple(n // (cfg.mesh[dcn_of[a]] if a in dcn_of else 1)
                      for a, n in zip(config_lib.MESH_AXES, devices.shape))
    ici = exposed = dcn = 0.0
    for c in hlo.collectives:
        if c.kind.startswith("dcn:"):
            dcn += hlo_cost.bytes_moved(c, report.num_slices) * c.count / chip.dcn_bw
            continue
        group = c.groups[0] if c.groups is not None else np.arange(len(local))
        members = [local[i] for i in group if i < len(local)]
        axes = _varying(np.array([np.unravel_index(int(i), ici_shape) for i in group]),
                        config_lib.MESH_AXES)
        physical = _varying(np.array([d.coords for d in members]), range(3))
        wraps = all(topology.wrap[a] for a in physical)
        bandwidth = chip.ici_link_bw * max(len(physical), 1) * (2 if wraps else 1)
        n = len(group) if c.kind != "collective-permute" else 2
        seconds = hlo_cost.bytes_moved(c, n) * c.count / bandwidth
        if set(axes) & set(ACTIVATION_AXES):
            exposed += seconds
        else:
            ici += seconds
    return Estimate(flops_s=flops_s, hbm_s=hbm_bytes / chip.hbm_bw, ici_s=ici,
                    exposed_s=exposed, dcn_s=dcn,
                    model_flops_per_chip=report.model_flops / report.chips,
                    peak=chip.peak_flops)


def _varying(coords: np.ndarray, names) -> list:
    """The names of the columns of `coords` (one row per group member) that vary."""
    return [name for name, column in zip(names, coords.T) if len(set(column.tolist())) > 1]


def candidate_meshes(cfg: ml_collections.ConfigDict, topology: topology_lib.Topology,
                     devices: list, slices: int) -> list[tuple[tuple[int, ...], tuple[int, int]]]:
    """(ICI sizes, (dcn_data, dcn_fsdp)) that the chip grid holds and the config validates
    on, in search order (rules 1-3 of the module docstring); the config's own first."""
    chips = topology.chips
    divisors = [n for n in range(1, chips + 1) if chips % n == 0]
    dcns = [(slices, 1), (1, slices)] if slices > 1 else [(1, 1)]
    found = []
    for sizes in itertools.product(divisors, repeat=len(config_lib.MESH_AXES)):
        if math.prod(sizes) != chips:
            continue
        shape = dict(zip(config_lib.MESH_AXES, sizes))
        if shape["context"] > 1 and cfg.data.global_batch_size >= chips * slices:
            continue
        for dcn in dcns:
            plan = Plan(sizes, dcn, cfg.model.remat, 1, cfg.model.attention,
                        cfg.quant.training)
            try:
                candidate = plan.apply(cfg)
                config_lib.validate(candidate, chips * slices)
                mesh_lib.make_mesh(candidate.mesh, devices)
            except ConfigError:
                continue
            found.append((sizes, dcn))
    own = own_plan(cfg, chips * slices)
    found.sort(key=lambda m: (m != (own.mesh, own.dcn), m[0][2] * m[0][3], m[0][0], m[1]))
    return found


def own_plan(cfg: ml_collections.ConfigDict, num_devices: int) -> Plan:
    shape = config_lib.ici_mesh_shape(cfg.mesh, num_devices)
    return Plan(tuple(shape[a] for a in config_lib.MESH_AXES),
                (cfg.mesh.dcn_data, cfg.mesh.dcn_fsdp), cfg.model.remat,
                cfg.optim.grad_accum_steps, cfg.model.attention, cfg.quant.training)


def accumulations(cfg: ml_collections.ConfigDict, plan: Plan) -> list[int]:
    """The gradient accumulation steps the batch allows on `plan`'s mesh, ascending."""
    rows = cfg.data.global_batch_size
    shape = dict(zip(config_lib.MESH_AXES, plan.mesh))
    shards = math.prod(shape[axis] for axis in config_lib.BATCH_AXES) * math.prod(plan.dcn)
    return [k for k in range(1, rows + 1) if rows % k == 0 and (rows // k) % shards == 0]


class Search:
    """Compiles plans in the module docstring's order within a time budget."""

    def __init__(self, make_task: Callable[[ml_collections.ConfigDict, int], Task],
                 cfg: ml_collections.ConfigDict, topology: topology_lib.Topology,
                 budget_s: float, out: Callable[[str], None],
                 dimensions: tuple[str, ...] = DIMENSIONS,
                 clock: Callable[[], float] = time.perf_counter):
        self.make_task, self.cfg, self.topology = make_task, cfg, topology
        self.dimensions = dimensions
        self.budget_s, self.out, self.clock = budget_s, out, clock
        self.start = clock()
        self.slowest = 0.0
        self.outcomes: dict[Plan, Outcome] = {}
        self.untried = 0  # meshes the budget left out

    def time_left(self) -> bool:
        return self.clock() - self.start + 1.2 * self.slowest <= self.budget_s

    def compile(self, plan: Plan, own: bool = False) -> Outcome | None:
        """The plan's outcome (compiled once); None when the budget is spent."""
        if plan in self.outcomes:
            return self.outcomes[plan]
        if not self.time_left():
            return None
        cfg = plan.apply(self.cfg)
        report = aot.compile_for_topology(lambda n: self.make_task(cfg, n), cfg,
                                          self.topology.name, analyse=True)
        self.slowest = max(self.slowest, report.compile_s)
        outcome = Outcome(plan, report.required_bytes, report.usable_hbm_bytes,
                          report.compile_s, estimate(report, cfg) if report.fits else None,
                          report.attention, report.argument_bytes * STATE_PER_ARGUMENTS, own)
        self.outcomes[plan] = outcome
        self.out(progress_line(outcome, self.clock() - self.start))
        return outcome

    def smallest_fit(self, plan: Plan) -> Plan | None:
        """`plan` with the smallest accumulation from plan.accum up that fits (only
        plan.accum when accumulation is not searched), or None."""
        options = [k for k in accumulations(self.cfg, plan) if k >= plan.accum]
        if "accum" not in self.dimensions:
            options = options[:1]
        while options:
            plan = dataclasses.replace(plan, accum=options[0])
            outcome = self.compile(plan)
            if outcome is None:
                return None
            if outcome.estimate is not None:
                return plan
            target = HEADROOM * outcome.usable_bytes - outcome.state_bytes
            if target <= 0:
                return None  # the state alone does not fit: no accumulation helps
            need = plan.accum * (outcome.required_bytes - outcome.state_bytes) / target
            options = [k for k in options if k > plan.accum and k >= need]
        return None

    def run(self, meshes: list[tuple[tuple[int, ...], tuple[int, int]]], own: Plan) -> None:
        self.compile(own, own=True)
        for i, (mesh, dcn) in enumerate(meshes):
            if not self.time_left():
                self.untried = len(meshes) - i
                break
            accum = 1 if "accum" in self.dimensions else own.accum
            remats = REMATS if "remat" in self.dimensions else (own.remat,)
            for remat in remats:
                fit = self.smallest_fit(Plan(mesh, dcn, remat, accum, own.attention, own.quant))
                if fit is None:
                    break  # less remat needs more memory
                accum = fit.accum
        best = self.best()
        if best is not None and best.attention == "splash" and "attention" in self.dimensions:
            self.smallest_fit(dataclasses.replace(best.plan, attention="xla"))
        best = self.best()
        if best is not None and "quant" in self.dimensions:
            for kind in quant_options(self.topology.chip, best.plan.quant):
                self.smallest_fit(dataclasses.replace(best.plan, quant=kind))

    def best(self) -> Outcome | None:
        fitting = [o for o in self.outcomes.values() if o.estimate is not None]
        return min(fitting, key=lambda o: o.estimate.step_s) if fitting else None


def quant_options(chip: topology_lib.Chip, own: str) -> list[str]:
    """quant.training values to try beside `own`: the 8-bit types `chip` runs faster than
    bf16, and none."""
    faster = [q for q in QUANT_TYPES if q != "none" and chip.peak_of(q) > chip.peak_flops]
    return [q for q in ["none", *faster] if q != own]


def progress_line(o: Outcome, elapsed: float) -> str:
    verdict = (f"est. {o.estimate.step_s:.3f} s/step" if o.estimate else "does not fit")
    return (f"[{elapsed:6.0f} s] mesh {o.plan.label():12} remat {o.plan.remat:12} "
            f"accum {o.plan.accum:<3} {o.attention:6} {o.plan.quant:5} "
            f"{o.required_bytes / GiB:7.2f} GiB  "
            f"{verdict} ({o.compile_s:.1f} s)")


def format_table(outcomes: list[Outcome]) -> str:
    """Fitting plans fastest first, then those that do not fit; `*` marks the config's own."""
    ranked = sorted(outcomes, key=lambda o: (o.estimate is None,
                                             o.estimate.step_s if o.estimate else o.required_bytes))
    head = (f"  {'mesh d x f x c x t x e':22} {'remat':12} {'accum':>5} {'attention':9} "
            f"{'quant':5} "
            f"{'HBM GiB':>8} {'flops s':>8} {'hbm s':>7} {'ici s':>7} {'exposed':>8} "
            f"{'dcn s':>7} {'step s':>8} {'est. MFU':>8}")
    lines = [head]
    for o in ranked:
        e = o.estimate
        row = (f"{'*' if o.own else ' '} {o.plan.label():22} {o.plan.remat:12} {o.plan.accum:>5} "
               f"{o.attention:9} {o.plan.quant:5} {o.required_bytes / GiB:8.2f} ")
        if e is None:
            row += f"{'does not fit':>8}"
        else:
            row += (f"{e.flops_s:8.3f} {e.hbm_s:7.3f} {e.ici_s:7.3f} {e.exposed_s:8.3f} "
                    f"{e.dcn_s:7.3f} {e.step_s:8.3f} {100 * e.mfu:7.1f}%")
        lines.append(row)
    return "\n".join(lines)


def run(make_task: Callable[[ml_collections.ConfigDict, int], Task],
        cfg: ml_collections.ConfigDict, topology_name: str, budget_s: float, command: str,
        search_text: str = DEFAULT_SEARCH, out: Callable[[str], None] = print) -> int:
    """The `plan` verb: searches `search_text`'s dimensions (comma-separated; the others
    keep the config's values), prints the table and the best plan's command line; exit
    aot.DOES_NOT_FIT_EXIT_CODE when no plan fits."""
    dimensions = tuple(d.strip() for d in search_text.split(",") if d.strip())
    if not dimensions or set(dimensions) - set(DIMENSIONS):
        raise ConfigError(f"--search {search_text!r}: expected a comma-separated subset of "
                          f"{', '.join(DIMENSIONS)}")
    if budget_s <= 0:
        raise ConfigError(f"--budget {budget_s}: must be a positive number of seconds")
    topology = aot.topology_of(topology_name, cfg)
    slices = config_lib.num_slices(cfg.mesh)
    chips = topology.chips * slices
    config_lib.validate(cfg, chips)  # the config itself, before any compile
    devices = topology_lib.compile_only_devices(topology, slices)
    own = own_plan(cfg, chips)
    meshes = (candidate_meshes(cfg, topology, devices, slices) if "mesh" in dimensions
              else [(own.mesh, own.dcn)])
    out(f"planning {cfg.model.family} ({zoo.param_count(cfg.model):,} parameters, batch "
        f"{cfg.data.global_batch_size} x {cfg.data.seq_len}) on "
        f"{f'{slices} slices of ' if slices > 1 else ''}{topology.name} ({chips} chips): "
        f"searching {', '.join(dimensions)} ({len(meshes)} meshes); budget {budget_s:.0f} s")
    search = Search(make_task, cfg, topology, budget_s, out, dimensions)
    search.run(meshes, own)
    outcomes = list(search.outcomes.values())
    out("")
    out(format_table(outcomes))
    spent = search.clock() - search.start
    out(f"{len(outcomes)} compiles in {spent:.0f} s"
        + (f"; the budget left {search.untried} of {len(meshes)} meshes untried"
           if search.untried else ""))
    best = search.best()
    if best is None:
        out("no plan fits in HBM")
        return aot.DOES_NOT_FIT_EXIT_CODE
    plan = dataclasses.replace(best.plan, attention=best.attention)
    e = best.estimate
    out(f"best plan: est. {e.step_s:.3f} s per step, {100 * e.mfu:.1f}% MFU, "
        f"{best.required_bytes / GiB:.2f} of {best.usable_bytes / GiB:.2f} GiB per chip")
    mine = search.outcomes.get(own)
    if mine is not None and mine.estimate is not None and mine is not best:
        out(f"config's own plan (*): est. {mine.estimate.step_s:.3f} s per step, "
            f"{100 * mine.estimate.mfu:.1f}% MFU")
    out(f"  {command} {' '.join(plan.overrides())}")
    return 0
