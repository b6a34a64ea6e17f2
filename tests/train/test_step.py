"""Loss, accumulation, schedule and weight-decay mask against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.model import zoo
from jaxlm.train import lm
from jaxlm.train import optimizer as optimizer_lib
from jaxlm.train import step as step_lib


def small_model_config():
    m = config_lib.defaults().model
    m.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=384,
             max_seq_len=64, remat="none")
    return m


def random_batch(batch, length, seed=0, pad_from=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 259, size=(batch, length + 1)).astype(np.int32)
    weights = np.ones((batch, length), np.float32)
    segments = np.ones((batch, length), np.int32)
    if pad_from is not None:  # the tail of each row is padding: segment 0, weight 0
        weights[:, pad_from:] = 0
        segments[:, pad_from:] = 0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)), "weights": weights}


def test_loss_is_mean_cross_entropy_over_real_tokens_only():
    cfg = small_model_config()
    model = zoo.create(cfg)
    graphdef, params = nnx.split(model)
    batch = random_batch(2, 16, pad_from=11)
    _, sums = lm.loss_sums(graphdef, nnx.to_pure_dict(params), batch, z_loss=0.0)
    logits = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    expected = nll[:, :11].mean()  # padding positions 11.. carry no loss
    np.testing.assert_allclose(float(sums["ce_sum"] / sums["weight_sum"]), expected, rtol=1e-5)
    assert float(sums["weight_sum"]) == 2 * 11


def _one_update(accum_steps, z_loss=0.0):
    cfg = config_lib.defaults()
    cfg.model = small_model_config()
    cfg.optim.update(grad_accum_steps=accum_steps, warmup_steps=0, z_loss=z_loss)
    # Plain SGD with rate 1: the update is exactly minus the (normalised) gradient.
    tx = optax.sgd(1.0)
    schedule = optimizer_lib.learning_rate_schedule(cfg.optim, 10)
    graphdef, params = nnx.split(zoo.create(cfg.model))
    params = nnx.to_pure_dict(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init({"params": params}), "nonfinite_steps": jnp.zeros((), jnp.int32)}
    # Rows padded differently, so a per-microbatch mean would weight tokens unequally.
    batch = random_batch(4, 16, seed=3)
    batch["weights"][0, 4:] = 0
    batch["weights"][3, 9:] = 0
    objective = step_lib.Objective(  # as the causal-LM task's (jaxlm.train.lm.CausalLM)
        lambda trainable, frozen, b, key, train: lm.loss_sums(
            graphdef, trainable["params"], b, z_loss if train else 0.0), lm.token_metrics)
    step = jax.jit(step_lib.make_train_step(objective, ("params",), cfg.optim, tx, schedule))
    return step(state, {}, batch)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_gradient_accumulation_equals_one_large_batch(z_loss):
    full_state, full_metrics = _one_update(1, z_loss)
    acc_state, acc_metrics = _one_update(4, z_loss)
    for key in ("loss", "grad_norm", "log_z_squared", "target_tokens"):
        np.testing.assert_allclose(acc_metrics[key], full_metrics[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 acc_state["params"], full_state["params"])


def test_z_loss_adds_its_term_to_the_objective():
    cfg = small_model_config()
    graphdef, params = nnx.split(zoo.create(cfg))
    params = nnx.to_pure_dict(params)
    batch = random_batch(2, 8)
    plain, sums = lm.loss_sums(graphdef, params, batch, z_loss=0.0)
    with_z, _ = lm.loss_sums(graphdef, params, batch, z_loss=0.5)
    np.testing.assert_allclose(with_z - plain, 0.5 * sums["z_sum"], rtol=1e-5)


def _reference_lr(step, peak, warmup, total, floor_ratio, kind, decay_fraction=0.2):
    if step < warmup:
        return peak * step / warmup
    t = step - warmup
    span = total - warmup
    if kind == "cosine":
        return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + np.cos(np.pi * min(t / span, 1))))
    decay = round(span * decay_fraction)
    if t < span - decay:
        return peak
    return peak + (peak * floor_ratio - peak) * min((t - (span - decay)) / decay, 1)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_learning_rate_schedule(kind):
    optim = config_lib.defaults().optim
    optim.update(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule=kind)
    schedule = optimizer_lib.learning_rate_schedule(optim, 110)
    for step in [0, 5, 10, 11, 50, 90, 95, 100, 109, 110]:
        np.testing.assert_allclose(float(schedule(step)),
                                   _reference_lr(step, 1e-3, 10, 110, 0.1, kind), rtol=1e-5, atol=1e-9)


def test_weight_decay_skips_norms_biases_and_embeddings():
    m = small_model_config()
    m.update(family="gpt2", n_kv_heads=4, tie_embeddings=False)
    params = nnx.to_pure_dict(nnx.split(zoo.create(m))[1])
    mask = optimizer_lib.decay_mask(params)
    flat = {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = {k for k, v in flat.items() if v}
    assert decayed == {"blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv", "blocks/attn/wo",
                       "blocks/mlp/w_in", "blocks/mlp/w_out", "lm_head"}
    # And the optimizer really leaves an un-decayed parameter alone when its gradient is 0.
    optim = config_lib.defaults().optim
    optim.update(warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    tx = optimizer_lib.make_optimizer(optim, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["embed"]).max()) == 0.0
    assert float(jnp.abs(updates["blocks"]["attn_norm"]["scale"]).max()) == 0.0
    np.testing.assert_allclose(updates["lm_head"], -optim.learning_rate * 0.5 * params["lm_head"], rtol=1e-5)


def test_clipping_rescales_gradients_to_the_global_norm_before_adam():
    optim = config_lib.defaults().optim
    optim.update(clip_norm=1.0, b1=0.9)
    tx = optimizer_lib.make_optimizer(optim, 10)
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
    _, opt_state = tx.update(grads, tx.init(params), params)
    adam_state = opt_state[1][0]
    # Adam's first moment after one step is (1 - b1) * the gradient it received.
    np.testing.assert_allclose(adam_state.mu["w"], 0.1 * np.array([0.6, 0.8, 0, 0]), rtol=1e-6)
