"""What one chip's compiled program executes, read from its HLO text: matmul FLOPs, HBM
traffic and every collective, each weighted by how many times it runs.

XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once, so for a
scanned layer stack (and the gradient-accumulation scan around it) it reports one layer of
one microbatch. This module reads the compiled text (`compiled.as_text()`), finds each
loop's trip count, and weights every computation by the product of the trip counts of the
loops around it:

- trip count: the loop's `known_trip_count` when the backend writes one (CPU, GPU), else its
  condition `compare(counter, constant N), direction=LT` (the TPU compiler's form; jax's
  scan and fori_loop count from 0);
- FLOPs: 2 x output elements x contracted size for every `dot` and `convolution` (the TPU
  compiler turns dots into convolutions), inside fusions too; those whose two operands are
  8-bit integers (quantized training's int8 x int8 matmuls) or 8-bit floats are also
  counted apart, since chips run them at their own peak;
- bytes: operands and results of the top-level instructions (the fusions' HBM traffic, not
  their insides). Used as a ratio, scaled / once-counted, to correct XLA's own "bytes
  accessed";
- collectives: all-gather, all-reduce, reduce-scatter (on TPU an all-reduce inside a
  custom fusion whose result is one shard), all-to-all and collective-permute (their async
  `-start` halves), with the replica groups they span (logical device ids: positions in the
  mesh's device order); and the transfers of a multi-slice program over the data-center
  network, which are `send`s tagged `_xla_megascale_transfer_type`, not collectives.

A Pallas kernel (splash attention) is a custom call XLA cannot look into: it counts no FLOPs
and no bytes here either.

Pure text processing (NumPy only): no JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$", re.DOTALL)
_NAME = re.compile(r"%([\w.\-]+)")
# Matmul operand types a chip may run faster than bfloat16 (jaxlm.parallel.topology.Chip).
LOW_PRECISION = {"s8": "int8", "u8": "int8", "f8e4m3fn": "fp8", "f8e5m2": "fp8"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Top-level instructions that move no data of their own.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
               "while", "conditional", "call", "opt-barrier", "partition-id", "replica-id"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str  # the result's shape text, e.g. "bf16[4,128]{1,0}" or a tuple
    opcode: str
    rest: str  # operands and attributes
    root: bool

    @property
    def operands(self) -> list[str]:
        return _NAME.findall(_operand_text(self.rest))


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVES, or "dcn:ALL_REDUCE" / "dcn:ALL_GATHER" (megascale)
    operand_bytes: float  # per execution, on one chip
    result_bytes: float
    groups: np.ndarray | None  # [groups, group size] logical device ids; None: all devices
    count: float  # executions per step (loop trip counts)


@dataclasses.dataclass(frozen=True)
class HloCost:
    flops_once: float  # dot/convolution FLOPs, each computation counted once (as XLA does)
    flops: float  # the same, weighted by trip counts
    bytes_once: float
    bytes: float
    collectives: tuple[Collective, ...]
    loops: dict[str, int | None]  # while instruction -> trip count (None: not found)
    # Weighted FLOPs of the matmuls on 8-bit operands (both of them), by LOW_PRECISION kind;
    # part of `flops`.
    low_precision: dict[str, float] = dataclasses.field(default_factory=dict)

    def corrected(self, xla_flops: float, xla_bytes: float) -> tuple[float, float]:
        """XLA's per-chip (flops, bytes accessed) with loop bodies counted as often as they
        run: the matmul FLOPs the weighting adds, and bytes scaled by the parsed ratio."""
        ratio = self.bytes / self.bytes_once if self.bytes_once else 1.0
        return xla_flops + self.flops - self.flops_once, xla_bytes * ratio


def shapes(text: str) -> list[tuple[str, list[int]]]:
    return [(dtype, [int(n) for n in dims.split(",") if n])
            for dtype, dims in _SHAPE.findall(text)]


def nbytes(text: str) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in shapes(text))


def _operand_text(rest: str) -> str:
    """The operand list of an instruction's text after `opcode(`: up to the matching `)`."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i]
    return rest


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations (name -> instructions) of an HLO module's text, and the entry's name.
    An instruction may run over several lines (attributes holding newlines)."""
    computations: dict[str, list[Instruction]] = {}
    current, entry, pending = None, None, ""

    def flush() -> None:
        m = _INSTRUCTION.match(pending)
        if current is not None and m:
            computations[current].append(
                Instruction(m.group(2), m.group(3), m.group(4), m.group(5), bool(m.group(1))))

    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current, pending = header.group(2), ""
            computations[current] = []
            if header.group(1):
                entry = current
        elif line.rstrip() == "}":
            flush()
            current, pending = None, ""
        elif _INSTRUCTION.match(line):
            flush()
            pending = line
        else:
            pending += "\n" + line
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def trip_count(instruction: Instruction, computations: dict[str, list[Instruction]]) -> int | None:
    """A while loop's trip count: its known_trip_count, else `counter < N` in its condition
    (the compare itself, or a fusion wrapping it, as the CPU compiler writes it)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.rest)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", instruction.rest).group(1)
    body = computations.get(condition, [])
    constants = {}
    for inst in body:
        value = re.match(r"(-?\d+)\)", inst.rest)
        if inst.opcode == "constant" and value:
            constants[inst.name] = int(value.group(1))
    root = next((inst for inst in body if inst.root), None)
    compare = root
    if root is not None and root.opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", root.rest)
        inside = computations.get(called.group(1), []) if called else []
        compare = next((inst for inst in inside if inst.root), None)
    if root is None or compare is None or compare.opcode != "compare" or \
            "direction=LT" not in compare.rest:
        return None
    bound = [constants[o] for o in root.operands if o in constants]
    return bound[0] if len(bound) == 1 else None


def _callees(inst: Instruction, computations, loops) -> list[tuple[str, int, bool]]:
    """(computation, times per execution of `inst`, control flow?) for what `inst` calls."""
    if inst.opcode == "while":
        trips = trip_count(inst, computations)
        loops[inst.name] = trips
        body = re.search(r"body=%([\w.\-]+)", inst.rest).group(1)
        condition = re.search(r"condition=%([\w.\-]+)", inst.rest).group(1)
        return [(body, trips or 1, True), (condition, (trips or 1) + 1, True)]
    found = []
    for key in ("calls", "to_apply", "true_computation", "false_computation"):
        for m in re.finditer(key + r"=%([\w.\-]+)", inst.rest):
            found.append((m.group(1), 1, inst.opcode in ("call", "conditional")))
    branches = re.search(r"branch_computations=\{([^}]*)\}", inst.rest)
    if branches:
        found += [(name, 1, True) for name in _NAME.findall(branches.group(1))]
    return found


def replica_groups(rest: str) -> np.ndarray | None:
    """The replica groups of a collective's attributes as a [groups, size] array (iota form
    `[G,S]<=[dims]T(perm)` or explicit `{{0,1},{2,3}}`); None when it spans every device."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if iota:
        g, s = int(iota.group(1)), int(iota.group(2))
        dims = [int(n) for n in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(n) for n in iota.group(4).split(",")])
        return ids.reshape(g, s)
    explicit = re.search(r"(?:replica_groups|source_target_pairs)=(\{(?:\{[\d,]*\},?)*\})", rest)
    if explicit:
        rows = [[int(n) for n in row.split(",") if n]
                for row in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
        rows = [r for r in rows if r]
        if rows and len({len(r) for r in rows}) == 1:
            return np.array(rows)
    return None


def analyse(text: str) -> HloCost:
    """The trip-count-weighted cost of the HLO module `text` (one chip's program)."""
    computations, entry = parse(text)
    types = {i.name: i.type for insts in computations.values() for i in insts}
    weight: dict[str, float] = collections.defaultdict(float)
    weight[entry] = 1.0
    control = {entry}  # computations that run as programs (not fused or reducer bodies)
    loops: dict[str, int | None] = {}
    # The call graph from the entry; then weights, callers before callees (an HLO call
    # graph is a DAG), adding up over call sites.
    seen = {entry}
    callers: dict[str, list[tuple[str, int, bool]]] = {}
    queue = [entry]
    while queue:
        name = queue.pop(0)
        callers[name] = []
        for inst in computations.get(name, []):
            for callee, times, is_control in _callees(inst, computations, loops):
                callers[name].append((callee, times, is_control))
                if is_control:
                    control.add(callee)
                if callee not in seen and callee in computations:
                    seen.add(callee)
                    queue.append(callee)
    for name in _topological(callers, entry):
        for callee, times, _ in callers.get(name, []):
            weight[callee] += weight[name] * times

    flops_once = flops = bytes_once = bytes_scaled = 0.0
    low_precision: dict[str, float] = collections.defaultdict(float)
    found: list[Collective] = []
    for name, insts in computations.items():
        w = weight.get(name, 0.0)
        # On TPU a reduce-scatter is an all-reduce in a fusion that keeps one slice of it.
        scatter_fusion = "scatter" in name or any(i.root and i.opcode == "dynamic-slice"
                                                  for i in insts)
        if name not in callers:
            continue  # not reached from the entry
        for inst in insts:
            f = _matmul_flops(inst, types)
            flops_once += f
            flops += f * w
            kind = _low_precision(inst, types) if f else None
            if kind:
                low_precision[kind] += f * w
            if name in control and inst.opcode not in _NO_TRAFFIC and w:
                b = _traffic(inst, types, computations)
                bytes_once += b
                bytes_scaled += b * w
            c = _collective(inst, types, w, scatter_fusion)
            if c is not None:
                found.append(c)
    return HloCost(flops_once, flops, bytes_once, bytes_scaled, tuple(found), loops,
                   dict(low_precision))


def _traffic(inst: Instruction, types: dict[str, str],
             computations: dict[str, list[Instruction]]) -> float:
    """HBM bytes a top-level instruction reads and writes: its operands and result, except
    that a slice read from a buffer (dynamic-slice) moves the slice, and an in-place update
    (dynamic-update-slice: a scan stacking its per-layer outputs) moves the update, also
    inside a fusion."""
    operands = [nbytes(types.get(o, "")) for o in inst.operands]
    result = nbytes(inst.type)
    body = None
    if inst.opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", inst.rest)
        body = computations.get(called.group(1)) if called else None
    if body is None:
        if inst.opcode == "dynamic-slice" and operands:
            operands[0] = result
        elif inst.opcode == "dynamic-update-slice" and len(operands) > 1:
            operands[0] = result = operands[1]
        return result + sum(operands)
    local = {i.name: i for i in body}
    users: dict[str, list[Instruction]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)

    def through_bitcasts(name: str) -> list[Instruction]:
        found = []
        for user in users.get(name, []):
            found += through_bitcasts(user.name) if user.opcode == "bitcast" else [user]
        return found

    params = {int(re.match(r"(\d+)", i.rest).group(1)): i.name
              for i in body if i.opcode == "parameter" and re.match(r"(\d+)", i.rest)}
    for index, name in params.items():
        uses = through_bitcasts(name)
        if index >= len(operands) or not uses:
            continue
        if all(u.opcode == "dynamic-slice" and u.operands[:1] and
               _source(u.operands[0], local) == name for u in uses):
            operands[index] = sum(nbytes(u.type) for u in uses)
        elif all(u.opcode == "dynamic-update-slice" and len(u.operands) > 1 and
                 _source(u.operands[0], local) == name for u in uses):
            operands[index] = sum(nbytes(local[u.operands[1]].type) for u in uses
                                  if u.operands[1] in local)
    root = next((i for i in body if i.root), None)
    if root is not None:
        outputs = root.operands if root.opcode == "tuple" else [root.name]
        result = sum(_written(o, local) for o in outputs)
    return result + sum(operands)


def _written(name: str, local: dict[str, Instruction]) -> float:
    """Bytes a fusion output writes: an in-place update's update, else the whole value."""
    inst = local.get(_source(name, local))
    if inst is not None and inst.opcode == "dynamic-update-slice" and \
            len(inst.operands) > 1 and inst.operands[1] in local:
        return nbytes(local[inst.operands[1]].type)
    return nbytes(local[name].type) if name in local else 0.0


def _source(name: str, local: dict[str, Instruction]) -> str:
    """`name` with the bitcasts it comes through undone."""
    while name in local and local[name].opcode == "bitcast" and local[name].operands:
        name = local[name].operands[0]
    return name


def _topological(callers: dict[str, list[tuple[str, int, bool]]], entry: str) -> list[str]:
    seen, out = set(), []

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for callee, _, _ in callers.get(name, []):
            visit(callee)
        out.append(name)

    visit(entry)
    return out[::-1]


def _matmul_flops(inst: Instruction, types: dict[str, str]) -> float:
    if inst.opcode not in ("dot", "convolution"):
        return 0.0
    out = shapes(inst.type)
    operands = inst.operands
    if not out or len(operands) < 2:
        return 0.0
    out_elements = math.prod(out[0][1])
    if inst.opcode == "dot":
        lhs = shapes(types.get(operands[0], ""))
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.rest)
        if not lhs or not dims:
            return 0.0
        contracted = math.prod(lhs[0][1][int(i)] for i in dims.group(1).split(",") if i)
        return 2.0 * out_elements * contracted
    lhs, rhs = shapes(types.get(operands[0], "")), shapes(types.get(operands[1], ""))
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.rest)
    if not lhs or not rhs or not labels:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    features = rhs[0][1][rhs_labels.index("i")]  # input features per group
    spatial = sorted(c for c in out_labels if c.isdigit())
    windows = _window(inst.rest, len(spatial))
    # Per spatial dimension: the (output, tap) pairs that read real input, not padding.
    pairs = math.prod(_pairs(lhs[0][1][lhs_labels.index(d)], out[0][1][out_labels.index(d)], *w)
                      for d, w in zip(spatial, windows))
    out_spatial = math.prod(out[0][1][out_labels.index(d)] for d in spatial)
    return 2.0 * out_elements / out_spatial * features * pairs


def _low_precision(inst: Instruction, types: dict[str, str]) -> str | None:
    """The LOW_PRECISION kind of a matmul whose two operands are both of it, else None."""
    kinds = [LOW_PRECISION.get(dtype) for o in inst.operands[:2]
             for dtype, _ in shapes(types.get(o, ""))[:1]]
    return kinds[0] if len(kinds) == 2 and kinds[0] == kinds[1] else None


def _window(rest: str, rank: int) -> list[tuple[int, int, int, int, int]]:
    """(size, stride, padding low, lhs dilation, rhs dilation) per spatial dimension."""
    text = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(f.split("=", 1) for f in text.group(1).split()) if text else {}

    def ints(key: str, default: int) -> list[int]:
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * rank

    low = ([int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields
           else [0] * rank)
    return list(zip(ints("size", 1), ints("stride", 1), low, ints("lhs_dilate", 1),
                    ints("rhs_dilate", 1)))


def _pairs(n: int, m: int, size: int, stride: int, low: int, lhs_dilation: int,
           rhs_dilation: int) -> int:
    """How many (output position, window tap) pairs of a convolution dimension read one of
    the `n` input positions (the rest read padding or dilation holes)."""
    if m * size > 1 << 22 and lhs_dilation == 1:  # per tap: the outputs that reach input
        t = np.arange(size) * rhs_dilation - low
        first = np.maximum(0, -(t // stride))
        last = np.minimum(m - 1, (n - 1 - t) // stride)
        return int(np.maximum(0, last - first + 1).sum())
    o = np.arange(m)[:, None]
    t = np.arange(size)[None, :]
    q = o * stride + t * rhs_dilation - low  # position in the dilated input
    valid = (q >= 0) & (q <= (n - 1) * lhs_dilation) & (q % lhs_dilation == 0)
    return int(valid.sum())


def _collective(inst: Instruction, types: dict[str, str], weight: float,
                scatter_fusion: bool) -> Collective | None:
    if inst.opcode == "send" and "_xla_megascale_transfer_type" in inst.rest:
        kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', inst.rest).group(1)
        sent = nbytes(types.get(inst.operands[0], "")) if inst.operands else 0.0
        return Collective("dcn:" + kind, sent, sent, None, weight)
    base = inst.opcode.removesuffix("-start")
    if base not in COLLECTIVES:
        return None
    operand_bytes = sum(nbytes(types.get(o, "")) for o in inst.operands)
    results = shapes(inst.type)
    if inst.opcode.endswith("-start") and len(results) > 1:
        results = results[len(results) // 2:]  # (operands..., results...)
    result_bytes = sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in results)
    if base == "all-reduce" and scatter_fusion:
        base = "reduce-scatter"
    return Collective(base, operand_bytes, result_bytes, replica_groups(inst.rest), weight)


def bytes_moved(c: Collective, n: int) -> float:
    """Bytes one chip sends per execution of `c` on a ring of `n` chips (the bandwidth-bound
    cost: all-gather out x (n-1)/n, reduce-scatter in x (n-1)/n, all-reduce twice that,
    all-to-all a quarter of an all-gather, permute its operand). Megascale transfers between
    `n` slices: an all-reduce's shard 2(n-1)/n times, an all-gather's n-1 times."""
    if c.kind == "dcn:ALL_REDUCE":
        return 2 * c.operand_bytes * (n - 1) / n
    if c.kind.startswith("dcn:"):
        return c.operand_bytes * (n - 1)
    if c.kind == "collective-permute":
        return c.operand_bytes
    if n <= 1:
        return 0.0
    share = (n - 1) / n
    return {"all-gather": c.result_bytes * share, "reduce-scatter": c.operand_bytes * share,
            "all-reduce": 2 * c.operand_bytes * share,
            "all-to-all": c.operand_bytes * share / 4}.get(c.kind, 0.0)
