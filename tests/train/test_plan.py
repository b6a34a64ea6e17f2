"""`jaxlm plan` on a small topology (v5p-8): the plan it chooses fits when `jaxlm compile`
checks it, and a plan it rejects as not fitting fails `jaxlm compile`. Asked to, the search
tries int8 training on its best plan where the chip's int8 peak is faster, and picks it when
its estimate is (the compiled int8 estimate: test_compile.py). (The parts: the
HLO cost reading in test_hlo_cost.py, the roofline's terms in test_compile.py.)"""

import pathlib
import re
import subprocess
import sys
import types

import pytest

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.parallel.topology import GiB
from jaxlm.train import plan

REPO = pathlib.Path(__file__).parents[2]
LLAMA = str(REPO / "configs" / "llama3_8b.py")
# A 0.5B llama on 4 chips, whose activations without remat (8 rows of 8k tokens per chip,
# 32 layers) do not fit in one piece.
SMALL = ["--config.model.d_model=1024", "--config.model.n_heads=8",
         "--config.model.n_kv_heads=8", "--config.model.d_ff=4096",
         "--config.model.vocab_size=32768", "--config.data.global_batch_size=32",
         "--config.mesh.topology=v5p-8", "--config.model.remat=none"]


def jaxlm(*args):
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_the_chosen_plan_fits_and_a_rejected_one_does_not():
    pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu")
    run = jaxlm("plan", "--config", LLAMA, *SMALL, "--search", "accum")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    rows = re.findall(r"^[* ] (\S+)\s+(\w+)\s+(\d+)\s+(\w+)\s+(\w+)\s+([\d.]+) (.*)$",
                      run.stdout, re.M)
    rejected = [r for r in rows if "does not fit" in r[6]]
    chosen = [r for r in rows if "does not fit" not in r[6]]
    assert rejected and chosen, run.stdout
    # The accumulation search: one microbatch does not fit, the smallest that does is next.
    assert rejected[0][:5] == ("1x4x1x1x1", "none", "1", "splash", "none")
    assert chosen[0][:5] == ("1x4x1x1x1", "none", "2", "splash", "none")
    line = re.search(r"^  jaxlm train --config (\S+) (.*)$", run.stdout, re.M)
    assert line.group(1) == LLAMA
    overrides = line.group(2).split()
    assert {"--config.optim.grad_accum_steps=2", "--config.quant.training=none"} <= set(overrides)

    fits = jaxlm("compile", "--config", LLAMA, *SMALL, *overrides)
    assert fits.returncode == 0, fits.stdout + fits.stderr[-3000:]
    assert "fits" in fits.stdout
    # The planner's figure is the compile's.
    total = re.search(r"total\s+([\d.]+) GiB", fits.stdout).group(1)
    assert float(total) == pytest.approx(float(chosen[0][5]), abs=0.01)

    rejected_plan = [o.replace("grad_accum_steps=2", "grad_accum_steps=1") for o in overrides]
    too_big = jaxlm("compile", "--config", LLAMA, *SMALL, *rejected_plan)
    assert too_big.returncode == 1, too_big.stdout + too_big.stderr[-3000:]
    assert "DOES NOT FIT" in too_big.stdout


def test_quant_search_compiles_int8_on_the_best_plan_and_keeps_the_faster(monkeypatch):
    """With `quant` in --search, the best plan is compiled again with int8 training where
    the chip runs int8 faster than bf16 (v5p), not where it does not (v4); the faster
    estimate wins. (Compiles replaced by reports whose estimate says int8 is faster.)"""
    cfg = config_lib.load(LLAMA, [])
    compiled = []

    def compile_for_topology(make_task, c, topology, analyse):
        compiled.append(c.quant.training)
        return types.SimpleNamespace(compile_s=1.0, required_bytes=GiB, fits=True,
                                     usable_hbm_bytes=90 * GiB, attention="splash",
                                     argument_bytes=GiB)

    def estimate(report, c):
        flops_s = 0.8 if c.quant.training == "int8" else 1.0
        return plan.Estimate(flops_s, 0.1, 0.1, 0.0, 0.0, 1e12, 459e12)

    monkeypatch.setattr(plan.aot, "compile_for_topology", compile_for_topology)
    monkeypatch.setattr(plan, "estimate", estimate)
    for chip, tried in (("v5p-128", ["none", "int8"]), ("v4-128", ["none"])):
        compiled.clear()
        own = plan.own_plan(cfg, 64)
        search = plan.Search(None, cfg, plan.topology_lib.parse(chip), 100, lambda _: None,
                             ("quant",))
        search.run([(own.mesh, own.dcn)], own)
        assert compiled == tried
        assert f"--config.quant.training={tried[-1]}" in search.best().plan.overrides()


def test_bad_search_and_budget_are_one_line_exit_2(capsys, monkeypatch):
    def no_devices(*args, **kwargs):
        raise AssertionError("libtpu was asked for devices")
    monkeypatch.setattr(plan.topology_lib, "compile_only_devices", no_devices)
    for args, says in ((["--search", "mesh,speed"], "--search 'mesh,speed'"),
                       (["--budget", "0"], "--budget 0"),
                       (["--topology", "v5p-7"], "--topology")):
        code = cli.main(["plan", "--config", LLAMA, *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, err


def test_candidate_plans_follow_the_chip_grid_and_the_config():
    """llama3_8b on v5p-128: the 4x4x4 cube cuts into axes of 1, 4, 16 or 64 chips; 8 kv
    heads allow tensor 1 or 4; with 256 rows for 64 chips there is no context parallelism;
    the config's own mesh (fsdp 64) comes first."""
    pytest.importorskip("libtpu", reason="TPU compile-only devices need libtpu")
    cfg = config_lib.load(LLAMA, [])
    t = plan.topology_lib.parse("v5p-128")
    meshes = plan.candidate_meshes(cfg, t, plan.topology_lib.compile_only_devices(t), 1)
    assert [m for m, _ in meshes] == [
        (1, 64, 1, 1, 1), (4, 16, 1, 1, 1), (16, 4, 1, 1, 1), (64, 1, 1, 1, 1),
        (1, 16, 1, 4, 1), (4, 4, 1, 4, 1), (16, 1, 1, 4, 1)]
    assert {dcn for _, dcn in meshes} == {(1, 1)}
    # Fewer rows than chips: context parallelism joins the search.
    cfg.data.global_batch_size = 16
    contexts = {m[2] for m, _ in plan.candidate_meshes(
        cfg, t, plan.topology_lib.compile_only_devices(t), 1)}
    assert contexts == {1, 4, 16, 64}  # 64: auto attention falls back to xla there
    assert plan.accumulations(
        cfg, plan.Plan((1, 16, 4, 1, 1), (1, 1), "full", 1, "auto", "none")) == [1]
    # A mixture of 8 experts: an expert axis of 4 joins the search (16 and 64 do not divide
    # 8; llama's meshes above have none).
    moe = config_lib.load(str(pathlib.Path(LLAMA).with_name("mixtral_8x7b.py")), [])
    experts = {m[4] for m, _ in plan.candidate_meshes(
        moe, t, plan.topology_lib.compile_only_devices(t), 1)}
    assert experts == {1, 4}
    # Its 256 rows split over fsdp 16 x expert 4 = 64 shards: at most 4 microbatches.
    assert plan.accumulations(
        moe, plan.Plan((1, 16, 1, 1, 4), (1, 1), "full", 1, "auto", "none")) == [1, 2, 4]
