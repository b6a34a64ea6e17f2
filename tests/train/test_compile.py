"""`jaxlm compile`: the real train step compiled for TPU topologies on this CPU host, its
per-chip memory checked against the state layout, its FLOPs against an independent count.

The compiled models here are wider than the other tests' (d_model 512, head_dim 128): they are
compiled for a TPU, never run, and TPU tiles pad dimensions under 128, which would blur the
comparison of XLA's argument bytes with the unpadded shard sizes."""

import dataclasses
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.model import attention
from jaxlm.parallel import topology
from jaxlm.parallel.topology import GiB
from jaxlm.train import plan
from jaxlm.train.lm import CausalLM
from jaxlm.train.validate import validate

REPO = pathlib.Path(__file__).parents[2]


# ---- topology names (no libtpu needed) ---------------------------------------------------

@pytest.mark.parametrize("name, chips, shape, wrap", [
    ("v5p-8", 4, (2, 2, 1), (False,) * 3),
    ("v5p-128", 64, (4, 4, 4), (True,) * 3),
    ("v5p-256", 128, (4, 4, 8), (True,) * 3),
    ("v5p-1024", 512, (8, 8, 8), (True,) * 3),
    ("v5p-1536", 768, (8, 8, 12), (True,) * 3),
    ("v4-32", 16, (2, 2, 4), (False,) * 3),
    ("v5e-16", 16, (4, 4), (False,) * 3),
    ("v5litepod-256", 256, (16, 16), (True, True, False)),
    ("v6e-1", 1, (1, 1), (False,) * 3),
    ("v5p:4x4x8", 128, (4, 4, 8), (True,) * 3),
])
def test_topology_names_map_to_chips(name, chips, shape, wrap):
    t = topology.parse(name)
    assert (t.chips, t.shape, t.wrap) == (chips, shape, wrap)


@pytest.mark.parametrize("name, says", [
    ("v5p-7", "must be even"),  # v5p names count 2 TensorCores per chip
    ("v5p-96", "whole 4x4x4 cubes"),  # 48 chips: neither a small slice nor whole cubes
    ("v5e-12", "slices have 1, 4, 8"),
    ("v9-8", "unknown TPU generation"),
    ("tpu", "is not a TPU slice"),
    ("v5e:2x2x2", "2-D chip grids"),
])
def test_bad_topology_names_are_one_clear_error(name, says):
    with pytest.raises(topology.TopologyError, match=re.escape(says)):
        topology.parse(name)


def test_bad_topology_is_rejected_before_compiling(capsys, monkeypatch):
    def no_devices(*args, **kwargs):
        raise AssertionError("libtpu was asked for devices")
    monkeypatch.setattr(topology, "compile_only_devices", no_devices)
    code = cli.main(["compile", "--config", str(REPO / "configs" / "tiny.py"), "--topology", "v5p-7"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--topology" in err and "v5p-7" in err
    cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py")
    cfg.model.vocab_size = 384
    cfg.mesh.topology = "v5p-7"
    with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.topology"):
        validate(cfg, 8)


# ---- compiled for a TPU (skipped only without libtpu) ------------------------------------

def wide_config(**mesh):
    cfg = config_lib.defaults()
    cfg.model.update(d_model=512, n_layers=2, n_heads=16, n_kv_heads=16, head_dim=128,
                     d_ff=1024, vocab_size=1024, max_seq_len=128, dtype="bfloat16",
                     remat="none", scan_layers=False, tie_embeddings=False,
                     attention="xla")  # XLA counts its FLOPs (not a splash kernel's)
    cfg.data.update(seq_len=128, global_batch_size=16)
    cfg.mesh.update(**mesh)
    return cfg


def independent_bytes(cfg, chips_per_axis):
    """(train state, batch) bytes on one chip from the RULES table's placements, by hand:
    float32 parameters and two Adam moments, int32/float32 batch rows."""
    m = cfg.model
    d, f, v, n, h, k = m.d_model, m.d_ff, m.vocab_size, m.n_layers, m.n_heads, m.head_dim
    fsdp, tensor = chips_per_axis["fsdp"], chips_per_axis["tensor"]
    params_per_chip = (
        2 * v * d / (tensor * fsdp)  # embedding (vocab/tensor, embed/fsdp) and lm_head
        + n * 4 * d * h * k / (fsdp * tensor)  # wq, wk, wv, wo
        + n * 3 * d * f / (fsdp * tensor)  # SwiGLU
        + (2 * n + 1) * d)  # norms, replicated
    state = 3 * 4 * params_per_chip + 2 * 4  # + step and non-finite counters
    rows = cfg.data.global_batch_size / (chips_per_axis["data"] * fsdp)
    batch = 5 * 4 * rows * cfg.data.seq_len
    params = 2 * v * d + n * (4 * d * h * k + 3 * d * f + 2 * d) + d
    return state, batch, params


@pytest.fixture(scope="module")
def aot():
    pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu")
    from jaxlm.train import aot
    return aot


COMPILES = {
    # one v5p-8 slice (4 chips): FSDP and tensor parallelism
    "v5p-8": ("v5p-8", dict(data=1, fsdp=2, tensor=2),
              dict(data=1, fsdp=2, context=1, tensor=2, expert=1)),
    # two v5p-8 slices over DCN: data parallel across them, FSDP inside each
    "2xv5p-8": ("v5p-8", dict(data=1, fsdp=4, tensor=1, dcn_data=2),
                dict(data=2, fsdp=4, context=1, tensor=1, expert=1)),
}


@pytest.fixture(scope="module", params=list(COMPILES))
def compiled(request, aot):
    name, mesh, sizes = COMPILES[request.param]
    cfg = wide_config(**mesh)
    return cfg, sizes, aot.compile_for_topology(lambda n: CausalLM(cfg, num_devices=n), cfg,
                                                name, mfu=0.4, analyse=True)


def test_memory_figures_match_the_state_layout(compiled):
    cfg, sizes, report = compiled
    state, batch, params = independent_bytes(cfg, sizes)
    m = report.memory
    assert report.mesh_shape == sizes and report.chips == math.prod(sizes.values())
    assert report.params == params
    # XLA's arguments are this chip's state and batch shards; TPU tiles pad the replicated
    # norm vectors a little, hence the tolerance.
    np.testing.assert_allclose(m.arguments, state + batch, rtol=2e-3)
    np.testing.assert_allclose(report.argument_bytes, state + batch, rtol=1e-5)
    # The donated state is reused for the new one: aliased = the state; outputs add metrics.
    np.testing.assert_allclose(m.aliased, state, rtol=2e-3)
    assert m.aliased <= m.outputs < m.aliased + 4096
    assert m.temporaries > 0 and m.generated_code > 0
    assert report.required_bytes == m.arguments + m.outputs - m.aliased + m.temporaries + m.generated_code
    assert report.fits and report.usable_hbm_bytes == int(95.74 * GiB)


def test_flops_match_an_independent_count(compiled):
    cfg, _, report = compiled
    m = cfg.model
    d, f, v, n, h, k = m.d_model, m.d_ff, m.vocab_size, m.n_layers, m.n_heads, m.head_dim
    tokens, seq = cfg.data.global_batch_size * cfg.data.seq_len, cfg.data.seq_len
    matmul_params = n * (4 * d * h * k + 3 * d * f) + d * v
    # Causal attention: half of QK^T and PV (the model FLOPs); the XLA kernel computes
    # chunk i of c query chunks against i + 1 key chunks, (c + 1) / 2c of the full square.
    full_attention = 12 * n * seq * h * k
    assert report.model_flops == pytest.approx(tokens * (6 * matmul_params + full_attention / 2))
    chunks = attention.QUERY_CHUNKS
    executed = tokens * (6 * matmul_params + full_attention * (chunks + 1) / (2 * chunks))
    # scan_layers=False, remat none: XLA counts every executed FLOP, elementwise ones included.
    assert 1.0 <= report.xla_flops / executed < 1.06
    peak = 459e12  # v5p bf16 per chip
    assert report.step_time_s == pytest.approx(report.model_flops / (0.4 * peak * report.chips))


def test_loop_weighted_cost_of_the_scanned_step_matches_the_unrolled_one(aot):
    """jaxlm.train.hlo_cost on the TPU compiler's text: the step with its layers scanned
    (XLA's cost analysis counts one layer) corrected by the loops' trip counts equals XLA's
    count of the same step unrolled: FLOPs within 2%; HBM bytes within 20%, since the scan
    body also moves its stacked buffers (the text's view of traffic, by which XLA's figure
    is scaled, is not XLA's per-operand one)."""
    reports = {}
    for scan in (True, False):
        cfg = wide_config(data=1, fsdp=2, tensor=2)
        cfg.model.update(scan_layers=scan, remat="full")
        reports[scan] = aot.compile_for_topology(lambda n: CausalLM(cfg, num_devices=n), cfg,
                                                 "v5p-8", analyse=True)
    scanned, unrolled = reports[True], reports[False]
    assert sorted(scanned.hlo.loops.values()) == [2, 2]  # forward and backward layer scans
    assert unrolled.hlo.loops == {}
    chips = unrolled.chips
    flops, hbm = scanned.hlo.corrected(scanned.xla_flops / chips, scanned.xla_bytes)
    assert scanned.xla_flops < 0.8 * unrolled.xla_flops
    # Matmuls weighted exactly; the elementwise FLOPs of the second layer are not added.
    np.testing.assert_allclose(flops, unrolled.xla_flops / chips, rtol=0.02)
    assert flops <= unrolled.xla_flops / chips
    np.testing.assert_allclose(hbm, unrolled.xla_bytes, rtol=0.2)
    assert scanned.xla_bytes < 0.8 * unrolled.xla_bytes


def test_roofline_splits_collectives_by_the_axes_they_cross(compiled):
    """Tensor-parallel collectives (activations) are exposed; FSDP's overlap with compute;
    only the two-slice program moves bytes over the data-center network."""
    cfg, sizes, report = compiled
    e = plan.estimate(report, cfg)
    assert e.ici_s > 0  # FSDP gathers and gradient reductions
    assert (e.exposed_s > 0) == (sizes["tensor"] > 1)
    assert (e.dcn_s > 0) == (report.num_slices > 1)
    assert e.flops_s > 0 and e.hbm_s > 0


def test_int8_training_matmuls_are_counted_apart_at_the_int8_peak(aot):
    """Quantized training's int8 x int8 matmuls (the block projections' forward and, with
    quant.backward=int8, their two gradient matmuls: 3 x the forward's FLOPs) are what
    hlo_cost counts apart, and the roofline runs them at v5p's int8 peak (918 TOPS)."""
    cfg = wide_config(data=1, fsdp=2, tensor=2)
    cfg.quant.update(training="int8", backward="int8")
    report = aot.compile_for_topology(lambda n: CausalLM(cfg, num_devices=n), cfg, "v5p-8",
                                      analyse=True)
    m = cfg.model
    projections = m.n_layers * (4 * m.d_model * m.n_heads * m.head_dim + 3 * m.d_model * m.d_ff)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    int8 = 3 * 2 * tokens * projections / report.chips
    assert report.hlo.low_precision == {"int8": int8}
    bf16_only = plan.estimate(dataclasses.replace(
        report, hlo=dataclasses.replace(report.hlo, low_precision={})), cfg)
    assert plan.estimate(report, cfg).flops_s == pytest.approx(
        bf16_only.flops_s - int8 / 459e12 + int8 / 918e12, rel=1e-9)
    assert plan.quant_options(topology.CHIPS["v5p"], "none") == ["int8"]
    assert plan.quant_options(topology.CHIPS["v4"], "none") == []  # int8 at bf16's rate
    assert plan.quant_options(topology.CHIPS["h100"], "int8") == ["none", "fp8"]


def test_a_step_that_does_not_fit_exits_nonzero_with_the_figures(aot, capsys):
    # The Llama-3-8B shape cut to 2 layers on one v5e chip (16 GiB): 1.49B parameters with
    # their two Adam moments alone take 16.6 GiB.
    code = cli.main(["compile", "--config", str(REPO / "configs" / "llama3_8b.py"),
                     "--topology", "v5e-1", "--config.model.n_layers=2",
                     "--config.data.seq_len=512", "--config.data.global_batch_size=8"])
    out = capsys.readouterr().out
    assert code == aot.DOES_NOT_FIT_EXIT_CODE
    assert "DOES NOT FIT" in out
    d, f, v, h, g, k = 4096, 14336, 128256, 32, 8, 128
    params = 2 * v * d + 2 * (d * (2 * h * k + 2 * g * k) + 3 * d * f + 2 * d) + d
    assert f"{params:,} parameters" in out
    arguments = float(re.search(r"arguments\s+([\d.]+) GiB", out).group(1))
    total = float(re.search(r"total\s+([\d.]+) GiB\s+of 15.75 GiB", out).group(1))
    assert arguments == pytest.approx((12 * params + 5 * 4 * 8 * 512) / GiB, abs=0.006)
    assert total > 15.75 and total >= arguments
    assert re.search(r"step time\s+[\d.]+ ms at 50% MFU \(197 TFLOP/s", out)


def compile_llama3_8b(*overrides):
    run = subprocess.run([sys.executable, "-m", "jaxlm.cli", "compile", "--config",
                          str(REPO / "configs" / "llama3_8b.py"), *overrides],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    return run.stdout


def gib(out, row):
    return float(re.search(rf"{row}\s+([\d.]+) GiB", out).group(1))


@pytest.mark.slow
def test_llama3_8b_compiles_for_its_topology_within_hbm_with_splash(aot):
    """The shipped 8B config on the slice it names (v5p-128), as a user runs it: splash
    attention (model.attention auto, on TPU), within the chip's HBM."""
    cfg = config_lib.load_config_file(REPO / "configs" / "llama3_8b.py")
    assert cfg.mesh.topology == "v5p-128" and cfg.model.attention == "auto"
    out = compile_llama3_8b()
    assert "64 chips of TPU v5" in out and "fsdp 64" in out
    assert re.search(r"attention\s+splash", out)
    params = 8_030_261_248
    assert f"{params:,} parameters" in out
    arguments = gib(out, "arguments")
    batch = 5 * 4 * (256 // 64) * 8192
    assert arguments == pytest.approx((12 * params / 64 + batch) / GiB, abs=0.01)
    total = float(re.search(r"total\s+([\d.]+) GiB\s+of 95.74 GiB", out).group(1))
    assert arguments < total < 95.74


@pytest.mark.parametrize("name", ["gpt2_124m", "llama_1b", "llama3_8b"])
def test_accelerator_configs_name_a_topology_their_mesh_fits(name):
    """Each shipped accelerator config names its slice; its mesh and batch divide it. (The
    memory check is `jaxlm compile`: the 8B one runs above, the figures of all three are in
    their docstrings.)"""
    cfg = config_lib.load_config_file(REPO / "configs" / f"{name}.py")
    t = topology.parse(cfg.mesh.topology)
    validate(cfg, t.chips * config_lib.num_slices(cfg.mesh))
    assert f"jaxlm compile --config configs/{name}.py" in (REPO / "configs" / f"{name}.py").read_text()


def test_a_mesh_the_chip_grid_cannot_hold_is_one_line_exit_2(aot, capsys):
    # fsdp 8 x context 8 on v5p-128's 4x4x4 cube: 8 is not a product of whole cube edges.
    code = cli.main(["compile", "--config", str(REPO / "configs" / "llama3_8b.py"),
                     "--config.mesh.context=8", "--config.data.global_batch_size=64"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("config.mesh: axes {'data': 1, 'fsdp': 8, 'context': 8, 'tensor': 1, 'expert': 1} "
            "do not map") in err
