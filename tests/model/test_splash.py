"""The `splash` attention backend (Pallas splash attention, interpreted on this CPU) computes
what the `xla` backend computes, forward and backward: causal and bidirectional, packed
documents, grouped-query (4:1) and multi-query attention, on one device and under
shard_map on an fsdp x tensor mesh of 8 simulated devices; and a whole train step of a
decoder (GQA) and of an encoder gives the xla step's loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharded_step import assert_same_step, step_on_mesh  # tests/sharded_step.py

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.model import attention, splash, zoo
from jaxlm.parallel import mesh as mesh_lib

B, L, K = 2, 256, 16
BLOCK = 128  # 2 x 2 tiles: the causal mask skips one, the others are full or partial


def segment_ids(packed: bool):
    if not packed:
        return None
    ids = np.ones((B, L), np.int32)
    ids[0, 100:] = 2  # documents that end inside a tile
    ids[1, 30:200] = 2
    ids[1, 200:] = 3
    return jnp.asarray(ids)


def qkv(heads, kv_heads, seed=0):
    r = np.random.default_rng(seed)
    draw = lambda h: jnp.asarray(r.normal(size=(B, L, h, K)).astype(np.float32))  # noqa: E731
    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def outputs_and_grads(backend, q, k, v, cot, ids, causal):
    """Attention output and the gradients of <output, cot> with respect to q, k, v."""
    prepare, attend = attention.BACKENDS[backend]
    mask = (splash.splash_prepare(ids, L, BLOCK) if backend == "splash"
            else prepare(ids, L, q.shape[2] // k.shape[2], causal))

    def f(q, k, v):
        out = attend(q, k, v, mask, causal=causal)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


CASES = {  # name: (heads, kv heads, packed, causal)
    "causal": (4, 4, False, True),
    "bidirectional": (4, 4, False, False),
    "packed causal": (4, 4, True, True),
    "packed bidirectional": (4, 4, True, False),
    "gqa 4:1 packed": (8, 2, True, True),
    "mqa": (4, 1, True, True),
}


def assert_same(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_splash_equals_xla_forward_and_backward(case):
    heads, kv_heads, packed, causal = CASES[case]
    q, k, v, cot = qkv(heads, kv_heads)
    ids = segment_ids(packed)
    assert_same(outputs_and_grads("splash", q, k, v, cot, ids, causal),
                outputs_and_grads("xla", q, k, v, cot, ids, causal))


@pytest.mark.parametrize("case", ["gqa 4:1 packed", "mqa"])
def test_splash_under_shard_map_on_fsdp_x_tensor(case):
    # GQA: the 2 kv heads split over tensor=2; MQA: each group's 4 query heads split, K/V
    # replicated. Rows over fsdp=4.
    heads, kv_heads, packed, causal = CASES[case]
    q, k, v, cot = qkv(heads, kv_heads, seed=1)
    ids = segment_ids(packed)
    want = outputs_and_grads("xla", q, k, v, cot, ids, causal)
    cfg = config_lib.defaults().mesh
    cfg.update(fsdp=4, tensor=2)
    mesh = mesh_lib.make_mesh(cfg, jax.devices()[:8])
    q4, k4, v4, cot4 = (jnp.concatenate([x, x]) for x in (q, k, v, cot))  # a row per shard
    ids4 = None if ids is None else jnp.concatenate([ids, ids])
    with mesh_lib.use(mesh):
        out, grads = jax.device_get(outputs_and_grads("splash", q4, k4, v4, cot4, ids4, causal))
    for rows in (slice(0, B), slice(B, 2 * B)):
        assert_same((out[rows], [g[rows] for g in grads]), want)


def test_block_size_defaults_and_configured():
    assert [splash.block_size(n) for n in (8192, 2048, 768, 384, 128)] == [512, 512, 256, 128, 128]
    assert splash.block_size(2048, 256) == 256
    assert splash.block_size(256, 512) == 256  # a prefill shorter than the configured tile
    for key, value in (("model.splash_block", 384), ("model.splash_block", 64),
                       ("data.seq_len", 200)):
        cfg = config_lib.defaults()
        cfg.model.update(attention="splash", max_seq_len=1024)
        cfg.data.seq_len = 256
        section, name = key.split(".")
        cfg[section][name] = value
        with pytest.raises(ConfigError, match=f"config.{key}: {value} is not a multiple"):
            config_lib.validate(cfg, num_devices=1)


def step_config(family, attention_backend):
    cfg = config_lib.defaults()
    cfg.model.update(family=family, d_model=64, n_layers=2, n_heads=8, d_ff=128,
                     vocab_size=384, max_seq_len=256, remat="full", attention=attention_backend,
                     splash_block=0, n_kv_heads=2 if family == "llama" else 8)
    cfg.data.update(seq_len=128, global_batch_size=8)
    cfg.optim.update(warmup_steps=0, z_loss=1e-4)
    cfg.train.steps = 10
    if family == "bert":
        cfg.objective.name = "masked_lm"
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_train_step_with_splash_equals_xla(family):
    want = step_on_mesh(step_config(family, "xla"), {"data": 1, "fsdp": 1, "tensor": 1})
    for sizes in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2}):
        assert_same_step(step_on_mesh(step_config(family, "splash"), sizes), want)


def test_auto_means_splash_on_tpu_and_whole_tiles_only():
    assert attention.resolve("auto", "tpu", 2048) == "splash"
    assert attention.resolve("auto", "cpu", 2048) == "xla"
    assert attention.resolve("auto", "gpu", 2048) == "xla"
    assert attention.resolve("splash", "cpu", 256) == "splash"  # interpreted: these tests
    assert attention.resolve("splash", "tpu", 200) == "xla"  # a prompt's prefill
    assert attention.resolve("cudnn", "gpu", 200) == "cudnn"
    # In a traced model: the splash kernel is a pallas_call; auto on this CPU is not.
    for backend, kernel in (("splash", True), ("auto", False), ("xla", False)):
        cfg = step_config("llama", backend).model
        model = zoo.create(cfg)
        tokens = jnp.zeros((2, 128), jnp.int32)
        assert ("pallas_call" in str(jax.make_jaxpr(lambda t: model(t))(tokens))) == kernel
