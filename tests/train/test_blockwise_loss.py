"""The blockwise cross-entropy (optim.loss_block) computes the plain loss and its gradients
(packing, loss masks, z-loss) on one device and sharded, and its compiled step never holds
the whole B x L x V logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_step import random_batch

from jaxlm import config as config_lib
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules
from jaxlm.train import lm


def model_config(vocab=384, max_seq_len=64):
    m = config_lib.defaults().model
    m.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=vocab,
             max_seq_len=max_seq_len, remat="none")
    return m


def packed_batch(rows=4, length=32):
    batch = random_batch(rows, length, seed=5)
    batch["segment_ids"][:, 10:] = 2  # two documents a row, the tail of some rows padding
    batch["positions"][:, 10:] -= 10
    batch["segment_ids"][1, 20:] = 0
    batch["weights"][1, 20:] = 0
    batch["weights"][2, :3] = 0  # a loss mask inside a document (SFT prompts)
    return batch


def loss_and_grads(graphdef, params, batch, block, z_loss=1e-3):
    def f(p):
        objective, sums = lm.loss_sums(graphdef, p, batch, z_loss, block)
        return objective, sums
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


def assert_same(got, want):
    ((objective, sums), grads), ((ref_objective, ref_sums), ref_grads) = got, want
    np.testing.assert_allclose(objective, ref_objective, rtol=1e-6)
    for key in ("ce_sum", "z_sum", "weight_sum"):
        np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=0, atol=1e-6 * scale),
                 grads, ref_grads)


def test_blockwise_loss_and_gradients_equal_the_plain_loss():
    graphdef, params = nnx.split(zoo.create(model_config()))
    params = nnx.to_pure_dict(params)
    batch = packed_batch()
    plain = loss_and_grads(graphdef, params, batch, block=32)  # one block: the plain loss
    for block in (8, 4, 1):
        assert_same(loss_and_grads(graphdef, params, batch, block), plain)
    # The plain loss is the textbook formula (float64 NumPy), so the blocks are too.
    logits = np.asarray(nnx.merge(graphdef, params)(batch["inputs"], batch["positions"],
                                                    batch["segment_ids"]), np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    np.testing.assert_allclose(float(plain[0][1]["ce_sum"]), (nll * w).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(plain[0][1]["z_sum"]), (log_z ** 2 * w).sum(), rtol=1e-6)


def test_blockwise_loss_sharded_equals_one_device():
    cfg = model_config()
    graphdef, params = nnx.split(zoo.create(cfg))
    want = loss_and_grads(graphdef, nnx.to_pure_dict(params), packed_batch(8), block=32)
    mesh_cfg = config_lib.defaults().mesh
    mesh_cfg.update(fsdp=4, tensor=2)
    mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:8])
    with mesh_lib.use(mesh):
        sharded = jax.device_put(nnx.to_pure_dict(params), rules.shardings_of(params, mesh))
        batch = mesh_lib.to_global_batch(packed_batch(8), mesh)
        got = jax.device_get(loss_and_grads(graphdef, sharded, batch, block=8))
    assert_same(got, want)


def test_automatic_block():
    assert lm.loss_block(2048, 128256) == 128  # 131 positions of 128k logits fit 64 MiB
    assert lm.loss_block(8192, 32000) == 512
    assert lm.loss_block(256, 384) == 256  # small vocabularies: one block, the plain loss
    assert lm.loss_block(2048, 128256, configured=256) == 256


@pytest.mark.parametrize("block", [0, 64])
def test_compiled_step_never_holds_the_whole_logits(block):
    # 8 rows x 512 positions x 32,768 vocabulary: 512 MiB of float32 logits in one piece.
    cfg = model_config(vocab=32768, max_seq_len=512)
    graphdef, params = nnx.split(zoo.create(cfg))
    batch = {k: jnp.asarray(v) for k, v in random_batch(8, 512, seed=1).items()}
    grad = jax.jit(jax.grad(lambda p: lm.loss_sums(graphdef, p, batch, 0.0, block)[0]))
    temp = grad.lower(nnx.to_pure_dict(params)).compile().memory_analysis().temp_size_in_bytes
    whole_logits = 8 * 512 * 32768 * 4
    chosen = lm.loss_block(512, 32768, block)
    assert chosen == (block or 512)
    if chosen == 512:  # one block: the logits and their gradient are both in memory
        assert temp >= whole_logits
    else:  # blocks of 64: one block's logits (and gradient) at a time
        assert temp < whole_logits / 2, (temp, whole_logits)
