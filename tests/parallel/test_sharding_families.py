"""The encoder (bert, masked LM) and encoder-decoder (t5, span corruption) families compute
the same step sharded over fsdp x tensor on 8 simulated devices as on one device: the
step's loss and gradient norm, and the gradients of the summed objective leaf by leaf."""

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.bench.step import synthetic_batch
from jaxlm.cli import tasks
from jaxlm.parallel import mesh as mesh_lib


def family_config(family):
    cfg = config_lib.defaults()
    cfg.model.update(family=family, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                     vocab_size=384, max_seq_len=64, remat="full")
    cfg.data.update(seq_len=32, global_batch_size=16)
    cfg.optim.update(warmup_steps=0, z_loss=1e-4, grad_accum_steps=2)
    cfg.train.steps = 10
    if family == "bert":
        cfg.objective.name = "masked_lm"
    else:
        cfg.objective.update(name="span_corruption", targets_len=12)
        cfg.model.update(n_decoder_layers=3, head_dim=12, gated_mlp=True, activation="gelu_tanh",
                         tie_embeddings=False)
    return cfg


def one_step(family, mesh_sizes):
    cfg = family_config(family)
    cfg.mesh.update(**mesh_sizes)
    n = int(np.prod(list(mesh_sizes.values())))
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:n])
    task = tasks.pretraining(cfg, num_devices=n)
    with mesh_lib.use(mesh):
        task.build(mesh)
        state = task.init_state()
        batch = synthetic_batch(task, seed=1)
        sums = task.objective().sums
        grad_fn = jax.jit(jax.grad(
            lambda p, b: sums({"params": p}, {}, b, None, False)[0]))
        grads = jax.device_get(grad_fn(state["params"], batch))
        _, metrics = task.train_step(state, {}, batch)
        return jax.device_get(metrics), grads


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_sharded_step_equals_one_device(family):
    ref_metrics, ref_grads = one_step(family, {"data": 1, "fsdp": 1, "tensor": 1})
    metrics, grads = one_step(family, {"data": 1, "fsdp": 4, "tensor": 2})
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    # Gradients leaf by leaf, to float32 accuracy of the largest gradient's scale (a leaf
    # whose exact gradient is zero, as the key bias's, holds rounding noise only).
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    jax.tree.map(lambda r, g: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale),
                 ref_grads, grads)
