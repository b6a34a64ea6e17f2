"""The mixture-of-experts layer (jaxlm.model.moe): every dispatch against the dense masked
reference and a float64 NumPy one; capacity drops exactly the documented assignments; the
routing figures against NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.model import moe, moe_cpu, zoo

E, K, D, F, T = 8, 2, 16, 24, 40


def layer_cfg(**overrides):
    cfg = config_lib.defaults().model
    cfg.update(family="moe", d_model=D, d_ff=F, n_experts=E, experts_per_token=K, n_layers=2,
               n_heads=2, n_kv_heads=2, vocab_size=64, max_seq_len=32, remat="none")
    cfg.update(overrides)
    return cfg


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(T, D)), rng.normal(size=(D, E)), rng.normal(size=(E, D, F)) / 4,
            rng.normal(size=(E, D, F)) / 4, rng.normal(size=(E, F, D)) / 4)


def numpy_moe(x, router, w_gate, w_up, w_down, k, norm_topk, keep=None):
    """float64: each token's top-k experts by softmax probability, weighted; `keep[t, j]`
    False drops token t's j-th choice."""
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, top, -1)
    if norm_topk:
        w = w / w.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(top[t]):
            if keep is not None and not keep[t, j]:
                continue
            g, u = x[t] @ w_gate[e], x[t] @ w_up[e]
            out[t] += w[t, j] * ((g / (1 + np.exp(-g)) * u) @ w_down[e])
    return out, logits, probs, top


@pytest.mark.parametrize("norm_topk", [True, False])
def test_every_dispatch_equals_the_float64_reference_and_dropless_grads_the_dense_ones(norm_topk):
    x, router, wg, wu, wd = weights()
    expected, *_ = numpy_moe(x, router, wg, wu, wd, K, norm_topk)
    args = [jnp.asarray(a, jnp.float32) for a in (x, router, wg, wu, wd)]

    def layer(dispatch, x, router, wg, wu, wd):
        w_TxK, e_TxK = moe.route(x @ router, K, norm_topk)
        if dispatch == "capacity":  # a factor large enough to drop nothing
            return moe.by_capacity(x, w_TxK, e_TxK, wg, wu, wd, factor=E / K)[0]
        if dispatch == "dense":
            return moe.dense(x, w_TxK, e_TxK, wg, wu, wd)
        return moe.dropless(x, w_TxK, e_TxK, wg, wu, wd, grouped=dispatch)

    dispatches = ("ragged", "blocks", "capacity", "dense")  # ragged, blocks: dropless
    outs = {d: layer(d, *args) for d in dispatches}
    for dispatch, out in outs.items():
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=dispatch)

    def loss(dispatch):
        return lambda *a: jnp.sum(jnp.sin(layer(dispatch, *a)))

    grads = {d: jax.grad(loss(d), argnums=(0, 1, 2, 3, 4))(*args) for d in dispatches}
    for dispatch in ("ragged", "blocks", "capacity"):
        for got, want in zip(grads[dispatch], grads["dense"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=dispatch)


def test_capacity_drops_the_assignments_over_capacity_in_token_order():
    x, router, wg, wu, wd = weights(1)
    factor = 0.5
    cap = moe.capacity(T, K, E, factor)
    _, _, _, top = numpy_moe(x, router, wg, wu, wd, K, True)
    # The documented order: position t * k + j; an expert keeps its first `cap`.
    seen = np.zeros(E, int)
    keep = np.zeros((T, K), bool)
    for t in range(T):
        for j in range(K):
            keep[t, j] = seen[top[t, j]] < cap
            seen[top[t, j]] += 1
    assert 0 < (~keep).sum() < keep.size  # some dropped, some kept
    expected, *_ = numpy_moe(x, router, wg, wu, wd, K, True, keep)
    args = [jnp.asarray(a, jnp.float32) for a in (x, router, wg, wu, wd)]
    w_TxK, e_TxK = moe.route(args[0] @ args[1], K, True)
    out, dropped = moe.by_capacity(args[0], w_TxK, e_TxK, *args[2:], factor=factor)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert float(dropped) == pytest.approx((~keep).mean())


def test_routing_figures_equal_numpy():
    x, router, *_ = weights(2)
    _, logits, probs, top = numpy_moe(*weights(2), K, True)
    figures = moe.routing_figures(jnp.asarray(logits, jnp.float32),
                                  jnp.asarray(top), jnp.zeros(()))
    counts = np.bincount(top.reshape(-1), minlength=E)
    aux = E * np.sum(counts / T * probs.mean(0))
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    assert float(figures.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert float(figures.z_loss) == pytest.approx(z, rel=1e-5)
    np.testing.assert_allclose(figures.load_E, counts / (T * K), rtol=1e-6)
    assert float(jnp.sum(figures.load_E)) == pytest.approx(1.0, rel=1e-6)


def test_the_moe_family_counts_its_parameters_and_trains_through_the_router():
    cfg = layer_cfg(d_shared=12, shared_gate=True)
    full = config_lib.defaults()
    full.model = config_lib.defaults().model
    full.model.update(cfg.to_dict())
    full.data.seq_len = 16
    config_lib.validate(full, 8)
    full.model.update(family="llama")
    with pytest.raises(config_lib.ConfigError, match="model.n_experts: only family .moe. has experts"):
        config_lib.validate(full, 8)
    model = zoo.create(cfg, 0)
    _, state = nnx.split(model)
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state)) == zoo.param_count(cfg)
    tokens = jnp.arange(2 * 16).reshape(2, 16) % 64
    x, figures = model.routed_hidden_states(tokens)
    assert figures.load_E.shape == (2, E)  # (layers, experts)
    np.testing.assert_allclose(jnp.sum(figures.load_E, axis=1), 1.0, rtol=1e-6)
    assert x.shape == (2, 16, D)


MIX_SIZES = np.array([0, 13, 1, 0, 30, 8])  # 52 assignments sorted by expert, 2 empty
MIX_TOKENS, MIX_D, MIX_F = 20, 5, 7


@functools.cache
def mixture_case():
    """A mixture's inputs (float64), the assignments' tokens (a token twice in expert 1's
    rows, 5 rows past sum(sizes) that count for nothing), a cotangent c, and a float64 NumPy
    loop's output and gradients of sum(c * out) (central differences, element by element)."""
    rng = np.random.default_rng(3)
    rows = MIX_SIZES.sum() + 5
    token = rng.integers(0, MIX_TOKENS, size=rows)
    token[1:3] = 7
    x, weight = rng.normal(size=(MIX_TOKENS, MIX_D)), rng.normal(size=rows)
    wg, wu = rng.normal(size=(2, len(MIX_SIZES), MIX_D, MIX_F)) / 2
    wd = rng.normal(size=(len(MIX_SIZES), MIX_F, MIX_D)) / 2
    c = rng.normal(size=(MIX_TOKENS, MIX_D))
    expert = np.repeat(np.arange(len(MIX_SIZES)), MIX_SIZES)

    def numpy_loss(x, weight, wg, wu, wd):
        out = np.zeros_like(x)
        for a, e in enumerate(expert):
            g, u = x[token[a]] @ wg[e], x[token[a]] @ wu[e]
            out[token[a]] += weight[a] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
        return out, np.sum(out * c)

    args = [x, weight, wg, wu, wd]
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            hi, lo = [b.copy() for b in args], [b.copy() for b in args]
            hi[i][j] += 1e-6
            lo[i][j] -= 1e-6
            g[j] = (numpy_loss(*hi)[1] - numpy_loss(*lo)[1]) / 2e-6
        grads.append(g)
    return args, token, c, numpy_loss(*args)[0], grads


@pytest.mark.parametrize("grouped,capacity", [("blocks", 1), ("blocks", 4), ("blocks", 12),
                                              ("blocks", 40), ("ragged", 0)])
def test_cpu_mixture_with_empty_and_overfull_experts_equals_a_loop(grouped, capacity):
    """The CPU mixture (each expert's first C assignments in batched matmuls, the rest in
    blocks: C=1 and 4, blocks of 8; C=12, blocks of 12 with a partial last one; C=40,
    none past it) and its gradients (its own backward) against a float64 NumPy loop over
    the assignments, with experts empty, under and over capacity; ragged_dot agrees."""
    args64, token, c, want, want_grads = mixture_case()
    args = [jnp.asarray(a, jnp.float32) for a in args64]
    token_j, sizes_j = jnp.asarray(token, jnp.int32), jnp.asarray(MIX_SIZES, jnp.int32)

    def run(x, weight, wg, wu, wd):
        if grouped == "blocks":
            return moe_cpu.mixture_blocks(x, token_j, weight, sizes_j, wg, wu, wd, capacity)
        return moe.mixture(x, token_j, weight, sizes_j, wg, wu, wd, 8, grouped)
    np.testing.assert_allclose(run(*args), want, rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(c, jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(run(*a) * cot), argnums=(0, 1, 2, 3, 4))(*args)
    for name, got, expected in zip(("x", "weight", "wg", "wu", "wd"), grads, want_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
