"""Context parallelism: a `context` mesh axis splits each sequence; causal rows run in the
balanced order (device i holds chunks i and 2c-1-i). On 8 simulated devices (context 4 x
fsdp 2 and context 2 x tensor 2 x fsdp 2) a step on packed causal rows gives the one-device
loss and gradients, with the xla and the splash backends; so does an encoder's with splash."""

import jax
import pytest
from flax import nnx
from sharded_step import assert_same_step, step_on_mesh  # tests/sharded_step.py

from jaxlm import config as config_lib
from jaxlm.bench.step import synthetic_batch
from jaxlm.cli import tasks
from jaxlm.errors import ConfigError
from jaxlm.infer.generate import Generator
from jaxlm.model import context, zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train.validate import validate


def test_balanced_order_gives_each_device_an_early_and_a_late_chunk():
    order = context.balanced_order(16, 4)  # 8 chunks of 2
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    per_device = order.reshape(4, 4)
    # Causal work of a device: the keys its queries see (original index + 1 each).
    work = (per_device + 1).sum(axis=1)
    assert len(set(work.tolist())) == 1
    assert sorted(order.tolist()) == list(range(16))


def step_config(family, backend, seq_len=1024):
    cfg = config_lib.defaults()
    cfg.model.update(family=family, d_model=64, n_layers=2, n_heads=8, d_ff=128,
                     vocab_size=384, max_seq_len=seq_len, remat="full", attention=backend,
                     n_kv_heads=2 if family == "llama" else 8)
    cfg.data.update(seq_len=seq_len, global_batch_size=4)
    cfg.optim.update(warmup_steps=0, z_loss=1e-4, loss_block=64)
    cfg.train.steps = 10
    if family == "bert":
        cfg.objective.name = "masked_lm"
    return cfg


ONE = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
MESHES = [{"data": 1, "fsdp": 2, "context": 4, "tensor": 1},
          {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}]


@pytest.mark.parametrize("backend, sizes", [("splash", MESHES[0]), ("splash", MESHES[1]),
                                           ("xla", MESHES[1])],
                         ids=["splash-context4xfsdp2", "splash-context2xtensor2xfsdp2",
                              "xla-context2xtensor2xfsdp2"])
def test_context_parallel_decoder_step_equals_one_device(backend, sizes):
    # The synthetic batch packs documents of several lengths per row (segment ids).
    want = step_on_mesh(step_config("llama", "xla"), ONE)
    assert_same_step(step_on_mesh(step_config("llama", backend), sizes), want, 1e-5, 0)


@pytest.mark.slow
def test_context_parallel_encoder_step_equals_one_device():
    """Splash on the split sequence against xla on one device (the decoder's test has xla
    split as well)."""
    want = step_on_mesh(step_config("bert", "xla"), ONE)
    assert_same_step(step_on_mesh(step_config("bert", "splash"), MESHES[0]), want, 1e-5, 0)


@pytest.mark.parametrize("overrides, key", [
    (dict(seq_len=100), "config.data.seq_len"),  # not 2 x 4 chunks
    (dict(attention="cudnn"), "config.model.attention"),
    (dict(attention="splash", seq_len=512), "config.data.seq_len"),  # 64-position chunks
    (dict(loss_block=192), "config.optim.loss_block"),
])
def test_context_parallel_bad_input_names_the_key(overrides, key):
    cfg = step_config("llama", overrides.get("attention", "xla"))
    cfg.optim.loss_block = 0
    cfg.mesh.update(**MESHES[0])
    if "seq_len" in overrides:
        cfg.data.seq_len = overrides["seq_len"]
        cfg.model.max_seq_len = 1024
    if "loss_block" in overrides:
        cfg.optim.loss_block = overrides["loss_block"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, 8)


def test_t5_refuses_context_parallelism():
    cfg = config_lib.defaults()
    cfg.model.update(family="t5", n_kv_heads=cfg.model.n_heads)
    cfg.objective.name = "span_corruption"
    cfg.data.packing = "concat"
    cfg.mesh.update(fsdp=4, context=2)
    with pytest.raises(ConfigError, match=r"config\.mesh\.context: .*'t5'"):
        validate(cfg, 8)


@pytest.mark.parametrize("backend, kernel", [("xla", False), ("splash", True)])
def test_the_sequence_is_split_over_the_context_axis(backend, kernel):
    cfg = step_config("llama", backend)
    cfg.mesh.update(**MESHES[0])
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:8])
    task = tasks.pretraining(cfg, num_devices=8)
    with mesh_lib.use(mesh):
        task.build(mesh)
        state = task.init_state()
        batch = synthetic_batch(task, seed=1)
        sums = task.objective().sums
        loss = jax.jit(lambda p, b: sums({"params": p}, {}, b, None, False)[0])
        text = loss.lower(state["params"], batch).as_text()
        jaxpr = str(jax.make_jaxpr(loss)(state["params"], batch))
    # Activations carry the context axis on their sequence dimension.
    assert '{"context"}' in text
    # Splash gathers keys and values across the axis inside its shard_map.
    assert ("pallas_call" in jaxpr and "all_gather" in jaxpr) == kernel


def test_generation_on_a_context_parallel_mesh_equals_one_device():
    # The prefill runs with the prompt's positions split over the context axis (xla, its
    # own order); the one-token decode steps too.


    cfg = step_config("llama", "auto").model
    cfg.update(max_seq_len=64)
    params = nnx.to_pure_dict(nnx.state(zoo.create(cfg, seed=3)))
    prompts = [[5, 9, 17, 3, 44, 7, 8, 1], [7, 8], list(range(1, 31))]
    mesh_cfg = config_lib.defaults().mesh
    mesh_cfg.update(fsdp=2, context=4)
    split = Generator(cfg, params, mesh_lib.make_mesh(mesh_cfg))
    want = Generator(cfg, params).generate(prompts, 12)
    assert [t.tolist() for t in split.generate(prompts, 12)] == [t.tolist() for t in want]
