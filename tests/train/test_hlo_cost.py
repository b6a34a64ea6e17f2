"""jaxlm.train.hlo_cost: loop trip counts, matmul FLOPs and collectives read from compiled
HLO text, against hand counts (a TPU-style module) and against XLA's own count of the same
program unrolled (CPU here; the TPU compile in test_compile.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.train import hlo_cost

# The TPU compiler's forms: a while with no known_trip_count (the bound is the condition's
# constant), a reduce-scatter as an all-reduce in a custom fusion ending in a dynamic-slice,
# iota replica groups, an instruction whose attributes run over three lines, and a
# multi-slice transfer as a megascale send.
TPU_STYLE = """HloModule m, entry_computation_layout={(bf16[8,16]{1,0})->bf16[8,16]{1,0}}

%fused_dot (p0: bf16[8,16], p1: bf16[16,32]) -> bf16[8,32] {
  %p0 = bf16[8,16]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[16,32]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %conv = bf16[8,32]{1,0:T(8,128)(2,1)} convolution(%p0, %p1), dim_labels=bf_io->bf
}

%heads (p2: bf16[4,16,32,1], p3: bf16[8,4,32,1]) -> bf16[4,16,8,4] {
  %p2 = bf16[4,16,32,1]{3,2,1,0} parameter(0)
  %p3 = bf16[8,4,32,1]{3,2,1,0} parameter(1)
  ROOT %c = bf16[4,16,8,4]{3,2,1,0} convolution(%p2, %p3), window={size=1x8 pad=0_0x7_7 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input: bf16[64,32]) -> bf16[16,32] {
  %input = bf16[64,32]{1,0} parameter(0)
  %all-reduce.1 = bf16[64,32]{1,0} all-reduce(%input), channel_id=1, replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true, to_apply=%add
  %pid = u32[] partition-id()
  %zero = u32[] constant(0)
  ROOT %ds = bf16[16,32]{1,0} dynamic-slice(%all-reduce.1, %pid, %zero), dynamic_slice_sizes={16,32}
}

%body (param: (s32[], bf16[8,16], bf16[16,32])) -> (s32[], bf16[8,16], bf16[16,32]) {
  %param = (s32[], bf16[8,16], bf16[16,32]) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %x = bf16[8,16]{1,0} get-tuple-element(%param), index=1
  %w = bf16[16,32]{1,0} get-tuple-element(%param), index=2
  %f = bf16[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %ag = bf16[64,32]{1,0} all-gather(%f), channel_id=2, frontend_attributes={kernel_metadata={
"xprof_metadata":"{}"
}}, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %rs = bf16[16,32]{1,0} fusion(%ag), kind=kCustom, calls=%all-reduce-scatter.1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[8,16], bf16[16,32]) tuple(%next, %x, %w)
}

%cond (param.1: (s32[], bf16[8,16], bf16[16,32])) -> pred[] {
  %param.1 = (s32[], bf16[8,16], bf16[16,32]) parameter(0)
  %i.1 = s32[] get-tuple-element(%param.1), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x.1: bf16[8,16], w.1: bf16[16,32], h: bf16[4,16,32,1], k: bf16[8,4,32,1]) -> bf16[8,16] {
  %x.1 = bf16[8,16]{1,0} parameter(0)
  %w.1 = bf16[16,32]{1,0} parameter(1)
  %h = bf16[4,16,32,1]{3,2,1,0} parameter(2)
  %k = bf16[8,4,32,1]{3,2,1,0} parameter(3)
  %hd = bf16[4,16,8,4]{3,2,1,0} fusion(%h, %k), kind=kOutput, calls=%heads
  %zero.1 = s32[] constant(0)
  %init = (s32[], bf16[8,16], bf16[16,32]) tuple(%zero.1, %x.1, %w.1)
  %loop = (s32[], bf16[8,16], bf16[16,32]) while(%init), condition=%cond, body=%body
  %tok = token[] after-all()
  %send = (bf16[8,16], u32[], token[]) send(%x.1, %tok), is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %out = bf16[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_tpu_style_module_by_hand():
    cost = hlo_cost.analyse(TPU_STYLE)
    assert cost.loops == {"loop": 6}
    # The loop's matmul (8x16 @ 16x32) six times; the heads convolution, whose 8-tap window
    # reads one real input position per output (the rest is padding), once:
    # 4 x 16 tokens x 32 in x 32 out.
    loop_dot, heads = 2 * 8 * 32 * 16, 2 * 64 * 32 * 32
    assert cost.flops_once == loop_dot + heads
    assert cost.flops == 6 * loop_dot + heads
    kinds = {c.kind: c for c in cost.collectives}
    assert set(kinds) == {"all-gather", "reduce-scatter", "dcn:ALL_REDUCE"}
    gather, scatter, dcn = kinds["all-gather"], kinds["reduce-scatter"], kinds["dcn:ALL_REDUCE"]
    assert (gather.count, gather.result_bytes, gather.operand_bytes) == (6, 64 * 32 * 2, 8 * 32 * 2)
    np.testing.assert_array_equal(gather.groups, [list(range(8))])
    assert (scatter.count, scatter.operand_bytes) == (6, 64 * 32 * 2)
    np.testing.assert_array_equal(scatter.groups, [[0, 2, 4, 6], [1, 3, 5, 7]])
    assert (dcn.count, dcn.operand_bytes, dcn.groups) == (1, 8 * 16 * 2, None)
    # Ring costs per chip: gather out x 7/8; scatter in x 3/4; two slices' all-reduce.
    assert hlo_cost.bytes_moved(gather, 8) == 4096 * 7 / 8
    assert hlo_cost.bytes_moved(scatter, 4) == 4096 * 3 / 4
    assert hlo_cost.bytes_moved(dcn, 2) == 256


def test_bytes_are_weighted_like_flops():
    cost = hlo_cost.analyse(TPU_STYLE)
    # Top-level instructions of the program's own computations (not the fusions' insides):
    # the body's fusion, gather, scatter fusion and add run 6 times, the condition's compare 7.
    body = (512 + 256 + 1024) + (4096 + 512) + (1024 + 4096) + (4 + 4 + 4)
    entry = (4096 + 4096 + 2048) + (256 + 4 + 256)  # heads fusion; send (+ its tuple)
    assert cost.bytes_once == body + 9 + entry
    assert cost.bytes == 6 * body + 7 * 9 + entry
    assert cost.corrected(100.0, 1000.0) == pytest.approx(
        (100.0 + cost.flops - cost.flops_once, 1000.0 * cost.bytes / cost.bytes_once))


def _grad_step(scan: bool):
    """A 6-layer ReLU MLP's gradients (weights and input): its layers scanned over stacked
    weights, or unrolled over six separate ones."""
    def loss(ws, x):
        if scan:
            x, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, ws)
        else:
            for w in ws:
                x = jax.nn.relu(x @ w)
        return jnp.sum(x**2)
    ws = jnp.zeros((6, 256, 256)) if scan else tuple(jnp.zeros((256, 256)) for _ in range(6))
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(ws, jnp.zeros((16, 256))).compile()


def test_scanned_program_counts_what_the_unrolled_one_does():
    scanned, unrolled = _grad_step(True), _grad_step(False)
    text = scanned.as_text()
    cost = hlo_cost.analyse(text)
    assert sorted(cost.loops.values()) == [6, 6]  # forward and backward scans
    xla_scanned = scanned.cost_analysis()["flops"]
    xla_unrolled = unrolled.cost_analysis()["flops"]
    matmuls = 6 * 3 * 2 * 16 * 256 * 256  # forward, dx, dw per layer
    assert cost.flops == matmuls
    assert hlo_cost.analyse(unrolled.as_text()).flops == matmuls
    flops, _ = cost.corrected(xla_scanned, 1.0)
    # XLA counted one layer; corrected, it counts all six, short of the elementwise FLOPs
    # of the other five (ReLU and its derivative: under 1% at this width).
    assert xla_scanned < 0.3 * xla_unrolled
    assert 0.98 * xla_unrolled < flops <= xla_unrolled
    # Without the CPU compiler's known_trip_count the bound comes from the condition.
    bare = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    assert "known_trip_count" not in bare
    assert hlo_cost.analyse(bare).loops == cost.loops
