"""Sharded training computes the same thing on every mesh, and parameters land where the
rules table says."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import config as config_lib
from jaxlm.bench.step import synthetic_batch
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules
from jaxlm.train import lm
from jaxlm.train.lm import CausalLM


def small_config():
    cfg = config_lib.defaults()
    cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=384,
                     max_seq_len=64, remat="full", tie_embeddings=False)
    cfg.data.update(seq_len=32, global_batch_size=16)
    cfg.optim.update(warmup_steps=0, z_loss=1e-4, grad_accum_steps=2)
    cfg.train.steps = 10
    return cfg


def one_step(cfg, mesh_sizes):
    """Loss, gradients-derived metrics and updated parameters after one step on a mesh."""
    cfg.mesh.update(**mesh_sizes)
    n = int(np.prod(list(mesh_sizes.values())))
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:n])
    task = CausalLM(cfg, num_devices=n)  # validates the config for n devices
    with mesh_lib.use(mesh):
        task.build(mesh)
        state = task.init_state()
        batch = synthetic_batch(task, seed=1)
        grad_fn = jax.jit(jax.grad(
            lambda p, b: lm.loss_sums(task.graphdef, p, b, 0.0)[0]))
        grads = jax.device_get(grad_fn(state["params"], batch))
        initial = jax.device_get(state)  # the step donates (deletes) its input state
        new_state, metrics = task.train_step(state, {}, batch)
    return initial, new_state, jax.device_get(metrics), grads


@pytest.fixture(scope="module")
def reference():
    return one_step(small_config(), {"data": 1, "fsdp": 1, "tensor": 1})


MESHES = [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
]


@pytest.mark.parametrize("mesh_sizes", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_same_step_on_every_mesh(reference, mesh_sizes):
    ref_init, _, ref_metrics, ref_grads = reference
    init, _, metrics, grads = one_step(small_config(), mesh_sizes)
    # Same initial parameters: initialisation does not depend on the mesh.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 ref_init["params"], init["params"])
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    # Gradients of the summed loss, leaf by leaf, to float32 accuracy of each leaf's scale.
    jax.tree.map(lambda r, g: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max()),
                 ref_grads, grads)


def test_parameter_shardings_follow_the_rules_table():
    _, new, _, _ = one_step(small_config(), {"data": 2, "fsdp": 2, "tensor": 2})
    params = new["params"]
    expected = {
        ("embed",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("blocks", "attn", "wq"): P(None, "fsdp", "tensor", None),
        ("blocks", "attn", "wk"): P(None, "fsdp", "tensor", None),
        ("blocks", "attn", "wo"): P(None, "tensor", None, "fsdp"),
        ("blocks", "mlp", "w_gate"): P(None, "fsdp", "tensor"),
        ("blocks", "mlp", "w_down"): P(None, "tensor", "fsdp"),
        ("blocks", "attn_norm", "scale"): P(None, None),
        ("final_norm", "scale"): P(None),
    }
    for path, spec in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, path
    # Adam's moments are sharded like their parameters.
    adam = new["opt_state"][1][0]
    assert adam.mu["params"]["blocks"]["attn"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)


def test_batch_is_sharded_over_data_fsdp_and_expert():
    cfg = small_config()
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    assert rules.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)


def test_logical_axis_without_rule_is_an_error():
    with pytest.raises(KeyError, match="experts"):
        rules.logical_to_spec(("experts", "embed"))


# ---- multi-slice: a hybrid mesh with DCN axes ------------------------------------------------

HYBRID_MESHES = [
    {"dcn_data": 2, "data": 1, "fsdp": 2, "tensor": 2},
    {"dcn_fsdp": 2, "data": 2, "fsdp": 1, "tensor": 2},
]


@pytest.mark.parametrize("mesh_sizes", HYBRID_MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_same_step_on_a_hybrid_mesh(reference, mesh_sizes):
    """Simulated slices (CPU devices carry no slice_index): the step is unchanged."""
    _, _, ref_metrics, ref_grads = reference
    _, _, metrics, grads = one_step(small_config(), mesh_sizes)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda r, g: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max()),
                 ref_grads, grads)


def test_simulated_slices_lie_along_the_dcn_axis():
    cfg = small_config()
    cfg.mesh.update(dcn_data=2, data=1, fsdp=2, tensor=2)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2, "expert": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # Slice s is devices 4s..4s+3 (a run in id order) and fills data index s.
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
    assert rules.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)

    cfg.mesh.update(dcn_data=1, dcn_fsdp=2, data=2, fsdp=1, tensor=2)
    ids = np.vectorize(lambda d: d.id)(mesh_lib.make_mesh(cfg.mesh).devices)
    assert sorted(ids[:, 0].ravel()) == [0, 1, 2, 3] and sorted(ids[:, 1].ravel()) == [4, 5, 6, 7]


@pytest.mark.parametrize("mesh_sizes, key", [
    ({"dcn_data": 3}, r"config\.mesh\.dcn_data: .*3 slices do not divide the 8 devices"),
    ({"dcn_fsdp": 0}, r"config\.mesh\.dcn_fsdp=0"),
    ({"dcn_data": 2, "data": 4, "fsdp": 2, "tensor": 1},
     r"config\.mesh: .* uses 8 devices but the 4 devices of each of 2 slices"),
])
def test_dcn_axes_are_validated(mesh_sizes, key):
    cfg = small_config()
    cfg.mesh.update(**mesh_sizes)
    with pytest.raises(config_lib.ConfigError, match=key):
        config_lib.validate(cfg, 8)
    with pytest.raises(config_lib.ConfigError, match=key):
        mesh_lib.make_mesh(cfg.mesh)


@pytest.fixture(scope="module")
def two_tpu_slices():
    """The devices of two v5p-8 slices as libtpu describes them (with slice_index)."""
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu")
    from jaxlm.parallel import topology
    return topology.compile_only_devices(topology.parse("v5p-8"), num_slices=2)


def test_tpu_slices_lie_along_the_dcn_axis(two_tpu_slices):
    from jax.experimental import mesh_utils
    cfg = small_config()
    cfg.mesh.update(dcn_data=2, data=1, fsdp=-1, tensor=1)
    mesh = mesh_lib.make_mesh(cfg.mesh, two_tpu_slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1, "expert": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    np.testing.assert_array_equal(slice_of[:, :, 0, 0, 0], [[0] * 4, [1] * 4])
    # The same placement as JAX's own hybrid mesh for devices that carry slice_index.
    expected = mesh_utils.create_hybrid_device_mesh((1, 4, 1, 1, 1), (2, 1, 1, 1, 1),
                                                    two_tpu_slices)
    np.testing.assert_array_equal(mesh.devices, expected)


def test_tpu_slice_count_must_match_the_dcn_axes(two_tpu_slices):
    cfg = small_config()
    cfg.mesh.update(dcn_data=1, data=1, fsdp=-1, tensor=1)
    with pytest.raises(config_lib.ConfigError,
                       match=r"config\.mesh\.dcn_data: the devices form 2 TPU slice"):
        mesh_lib.make_mesh(cfg.mesh, two_tpu_slices)
