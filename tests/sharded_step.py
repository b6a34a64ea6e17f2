"""One pretraining step of a config on a mesh of this process's simulated devices: what the
sharding tests compare against one device (tests/parallel, tests/model/test_splash.py)."""

from __future__ import annotations

import jax
import numpy as np

from jaxlm.bench.step import synthetic_batch
from jaxlm.cli import tasks
from jaxlm.parallel import mesh as mesh_lib


def step_on_mesh(cfg, mesh_sizes: dict):
    """(the train step's metrics, the gradients of the summed objective) of `cfg`'s task on
    a synthetic batch (seed 1), on a mesh of the first prod(mesh_sizes) devices."""
    cfg.mesh.update(**mesh_sizes)
    n = int(np.prod(list(mesh_sizes.values())))
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:n])
    task = tasks.pretraining(cfg, num_devices=n)
    with mesh_lib.use(mesh):
        task.build(mesh)
        state = task.init_state()
        batch = synthetic_batch(task, seed=1)
        sums = task.objective().sums
        grads = jax.jit(jax.grad(lambda p, b: sums({"params": p}, {}, b, None, False)[0]))(
            state["params"], batch)
        _, metrics = task.train_step(state, {}, batch)
        return jax.device_get(metrics), jax.device_get(grads)


def assert_same_step(got, want, grad_norm_rtol: float = 1e-4, grad_rtol: float = 1e-4):
    """Loss within 1e-5 relative; gradients leaf by leaf to float32 accuracy of the largest
    gradient's scale (a leaf whose exact gradient is zero holds rounding noise only)."""
    (metrics, grads), (ref_metrics, ref_grads) = got, want
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"],
                               rtol=grad_norm_rtol)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    jax.tree.map(lambda r, g: np.testing.assert_allclose(g, r, rtol=grad_rtol,
                                                         atol=1e-5 * scale),
                 ref_grads, grads)
