"""QLoRA (finetune.base_quant): LoRA on a frozen base held as nf4 or int8 codes. The base
stays bit-identical in its quantized form (what quantizing the base run gives, every
time) and the base run is untouched; the loss falls as LoRA's does on the same data; merge
writes a float run whose logits equal the quantized base plus adapters; generation from
the QLoRA run equals generation from its merge, and `jaxlm quantize` of it evaluates
within 1% of the merge; a sharded run's losses equal a
data-parallel one's; bad input is one line and exit 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from flax import nnx

from jaxlm import cli
from jaxlm.checkpoint import fingerprint
from jaxlm.cli import tasks
from jaxlm.finetune import merge
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.infer import evaluate, generate, quantize
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.quant import weights as quant_weights
from jaxlm.train import loop

GROUPS = {"nf4": 8, "int8": 0}  # the base: d_model 32, d_ff 48, head_dim 8
STEPS = 12


def qlora_cfg(make_cfg, sft_file, quant, **sections):
    cfg = make_cfg("sft", "lora", sft_file, steps=STEPS, every=STEPS, **sections)
    if quant != "none":
        cfg.finetune.update(base_quant=quant, base_quant_group=GROUPS[quant])
    return cfg


def train(cfg, workdir):
    task = FinetuneTask(cfg, workdir)
    return task, [m["loss"] for m in loop.train(task, workdir) if "loss" in m]


@pytest.fixture(scope="module")
def runs(make_cfg, sft_file, base_run, tmp_path_factory):
    """LoRA, QLoRA nf4 and QLoRA int8 on the same base and data: {name: (workdir, task,
    per-step losses)}; and the base run's files before any of them."""
    before = run_fixture.snapshot(base_run[0])
    out = {}
    for quant in ("none", "nf4", "int8"):
        workdir = tmp_path_factory.mktemp(f"qlora_{quant}")
        out[quant] = (workdir, *train(qlora_cfg(make_cfg, sft_file, quant), workdir))
    return out, before


def test_base_stays_bit_identical_in_its_quantized_form(runs, base_run):
    trained, before = runs
    assert run_fixture.snapshot(base_run[0]) == before
    for quant in GROUPS:
        workdir, task, _ = trained[quant]
        frozen = task.frozen["params"]
        codes = frozen["blocks"]["attn"]["wq"]
        assert codes.dtype == (jnp.uint8 if quant == "nf4" else jnp.int8)  # nf4: packed
        assert task.cfg.model.weights == quant
        fresh = quant_weights.restore_quantized(task.base.step_dir, task.cfg.model, task.mesh)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                                np.asarray(b, np.float32)),
                     frozen, fresh)
        assert task.base_fingerprint == fingerprint.digest(fresh)


def test_loss_falls_as_lora_does(runs):
    trained, _ = runs
    _, _, lora_losses = trained["none"]
    lora_drop = lora_losses[0] - lora_losses[-1]
    assert lora_drop > 0.5, lora_losses
    for quant in GROUPS:
        losses = trained[quant][2]
        assert len(losses) == STEPS
        assert abs(losses[0] - lora_losses[0]) < 0.05 * lora_losses[0]
        assert losses[0] - losses[-1] >= 0.8 * lora_drop, (quant, losses, lora_losses)


def test_merge_is_the_quantized_base_plus_adapters(runs, tmp_path):
    trained, _ = runs
    workdir, task, _ = trained["nf4"]
    state, _ = task.restore_newest(workdir)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, size=(2, 24)), jnp.int32)
    params = task.eval_params({g: state[g] for g in task.spec.groups}, task.frozen)
    with mesh_lib.use(task.mesh):
        want = np.asarray(jax.jit(lambda p, t: nnx.merge(task.eval_graphdef, p)(t))(params,
                                                                                    tokens))
    merge.merge_run(workdir, tmp_path / "merged", log=lambda _: None)
    gen, _, cfg = generate.load(tmp_path / "merged")
    assert cfg.model.weights == "float" and cfg.finetune.method == "full"
    got = np.asarray(jax.jit(lambda p, t: nnx.merge(gen.graphdef, p)(t))(gen.params, tokens))
    np.testing.assert_allclose(got, want, atol=1e-4)
    prompts = [[1, 60, 61, 62], [1, 70]]
    direct, _, _ = generate.load(workdir)
    assert [list(o) for o in direct.generate(prompts, 12)] == \
        [list(o) for o in gen.generate(prompts, 12)]
    # `jaxlm quantize` reads the QLoRA run as its merge; `jaxlm eval` reads what it writes
    quantize.quantize_run(workdir, tmp_path / "int8", "int8", log=lambda _: None)
    losses = [evaluate.evaluate(tasks.for_run(w), w)["loss"]
              for w in (tmp_path / "merged", tmp_path / "int8")]
    assert abs(np.exp(losses[1] - losses[0]) - 1) < 0.01, losses


def test_sharded_qlora_equals_data_parallel(make_cfg, sft_file, tmp_path):
    losses = {}
    for name, mesh in (("data", {"data": 8, "fsdp": 1}),
                       ("fsdp x tensor", {"data": 1, "fsdp": 4, "tensor": 2})):
        cfg = qlora_cfg(make_cfg, sft_file, "nf4", mesh=mesh, train={"steps": 4})
        losses[name] = train(cfg, tmp_path / name.replace(" ", "_"))[1]
    np.testing.assert_allclose(losses["fsdp x tensor"], losses["data"], rtol=1e-5)


def test_bad_input_is_one_line_and_exit_2(make_cfg, sft_file, base_run, tmp_path, capsys):
    def refused(overrides, *words):
        argv = ["finetune", "--config", str(run_fixture.CONFIG_DIR / "lora_tiny.py"),
                f"--config.finetune.base={base_run[0]}",
                f"--config.finetune.train_file={sft_file}", "--workdir", str(tmp_path / "w"),
                *overrides]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
        assert not (tmp_path / "w").exists()

    refused(["--config.finetune.base_quant=nf4", "--config.finetune.method=full"],
            "finetune.base_quant", "needs method 'lora'")
    refused(["--config.finetune.base_quant=int4"], "finetune.base_quant", "'int4' not in")
    refused(["--config.finetune.base_quant=nf4", "--config.finetune.base_quant_group=32"],
            "finetune.base_quant_group", "32 does not divide", "d_ff=48")
    quantize.quantize_run(base_run[0], tmp_path / "int8", "int8", log=lambda _: None)
    refused([f"--config.finetune.base={tmp_path / 'int8'}"], "is a quantized run",
            "finetune.base_quant")
