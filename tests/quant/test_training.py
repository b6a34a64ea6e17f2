"""Quantized training (config `quant`, jaxlm.quant.training): int8 matmuls in the compiled
step, a loss curve that tracks the float run, float parameters and checkpoints, the same
step sharded as on one device, and bad input refused in one line."""

import pathlib
import re

import jax
import numpy as np
import pytest
from sharded_step import step_on_mesh  # tests/sharded_step.py

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import loop
from jaxlm.train.lm import CausalLM
from jaxlm.train.validate import validate

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


def quant_config(data_dir, training="int8", **quant):
    cfg = config_lib.load_config_file(CONFIGS / "tiny.py")
    cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                     max_seq_len=128)
    cfg.data.update(data_dir=data_dir, seq_len=128, global_batch_size=16)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=10)
    cfg.train.update(steps=200, log_every=1)
    cfg.checkpoint.update(every=200, keep=1)
    cfg.metrics.update(peak_flops=1e11, tensorboard=False)
    cfg.quant.update(training=training, **quant)
    return cfg


def lowered_step_text(cfg) -> str:
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    cfg.mesh.update(data=1, fsdp=1, context=1, tensor=1)
    task = CausalLM(cfg, num_devices=1)
    task.build(mesh)
    with mesh_lib.use(mesh):
        return task.lower().as_text()


def int8_dots(text: str) -> list[str]:
    return [d for d in re.findall(r"stablehlo.dot_general[^\n]*", text)
            if re.search(r"tensor<[\dx]*xi8>, tensor<[\dx]*xi8>", d)]


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_compiled_step_multiplies_int8_in_every_projection(stdlib_data_dir, remat):
    cfg = quant_config(stdlib_data_dir)
    cfg.model.remat = remat
    text = lowered_step_text(cfg)
    # In the layer scan's body, int8 x int8 into int32, one for each projection: wq, wk and
    # wv (64 -> 4 x 16, 2 x 16, 2 x 16), wo (64 -> 64), gate and up (64 -> 192), down.
    dots = int8_dots(text)
    rhs = {re.search(r"tensor<[\dx]*xi8>, tensor<([\dx]*)xi8>", d).group(1) for d in dots}
    assert rhs == {"64x64", "64x32", "64x192", "192x64"}, rhs
    assert all("xi32>" in d.split("->")[-1] for d in dots)
    # Quantized gradients (quant.backward) add the backward's matmuls in int8.
    cfg.quant.backward = "int8"
    assert len(int8_dots(lowered_step_text(cfg))) > len(dots)
    # The float step has none. (The LM head, d_model x vocabulary, is float in both: its
    # shape is not among the int8 dots above.)
    assert int8_dots(lowered_step_text(quant_config(stdlib_data_dir, "none"))) == []


def test_int8_training_tracks_the_float_run(stdlib_data_dir, tmp_path):
    """200 steps on the default corpus: the int8 run's final loss within 5% of the float
    run's; its parameters and checkpoint stay float32."""
    runs = {}
    for training in ("none", "int8"):
        cfg = quant_config(stdlib_data_dir, training)
        task = CausalLM(cfg)
        history = loop.train(task, tmp_path / training)
        runs[training] = [h["loss"] for h in history if "loss" in h]
    float_loss, int8_loss = runs["none"], runs["int8"]
    assert len(float_loss) == len(int8_loss) == 200
    assert int8_loss[-1] < 0.6 * int8_loss[0]  # it learns
    tail = lambda losses: float(np.mean(losses[-10:]))  # noqa: E731
    assert abs(tail(int8_loss) - tail(float_loss)) <= 0.05 * tail(float_loss), (
        tail(int8_loss), tail(float_loss))
    assert int8_loss != float_loss  # the matmuls were quantized
    # Master weights: the checkpoint holds float32 parameters of the float model's layout.
    restored = checkpoint_lib.restore_params(str(tmp_path / "int8"), task.spec.abstract["params"])
    dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(restored)}
    assert dtypes == {np.dtype("float32")}


@pytest.mark.parametrize("training, mesh", [
    ("int8", dict(data=2, fsdp=2, context=1, tensor=2)),
    ("fp8", dict(data=1, fsdp=4, context=1, tensor=2))])
def test_a_sharded_quantized_step_equals_one_device(stdlib_data_dir, training, mesh):
    """The same quantized step on fsdp x tensor meshes of 8 simulated devices. Sharded
    matmuls add their partial sums in another order, and a value within float32 rounding
    of a half step rounds to the neighbouring int8 level; so the loss agrees to 1e-4 and
    each gradient to 1% of its norm (measured: 0.6% for int8, 5e-7 for fp8; int8 against
    the float step differs by 1.3%, fp8 by 5%)."""
    cfg = quant_config(stdlib_data_dir, training)
    metrics, grads = step_on_mesh(cfg.copy_and_resolve_references(), mesh)
    ref_metrics, ref_grads = step_on_mesh(cfg.copy_and_resolve_references(),
                                          dict(data=1, fsdp=1, context=1, tensor=1))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-4)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-2)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert np.linalg.norm(g - r) <= 0.01 * np.linalg.norm(r) + 1e-7


@pytest.mark.parametrize("override, says", [
    ("--config.quant.training=int4", "config.quant.training: 'int4' not in"),
    ("--config.quant.backward=int8", "config.quant.backward: 'int8' needs quant.training"),
    ("--config.quant.layers=blocks/(", "config.quant.layers: 'blocks/(' is not a regular"),
])
def test_bad_quantization_is_one_line_exit_2(override, says, capsys, tmp_path):
    code = cli.main(["train", "--config", str(CONFIGS / "tiny.py"), override,
                     "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["sft_tiny", "t5_tiny"])
def test_quantized_fine_tuning_and_t5_are_refused_until_they_exist(name):
    cfg = config_lib.load(str(CONFIGS / f"{name}.py"), ["--config.quant.training=int8"])
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.quant.training: 'int8' quantizes the pretraining"):
        validate(cfg, 1)
