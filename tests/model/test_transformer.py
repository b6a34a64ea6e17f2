"""The Transformer against an independent float64 NumPy reference, plus masking, parameter
count, scan/remat equivalence and sharding annotations."""

import contextlib
import importlib.util
import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from flax import nnx
from jax import ad_checkpoint

from jaxlm import config
from jaxlm.model import counts, zoo
from jaxlm.parallel import rules

# Loaded by path under a unique name, so it cannot clash with another test directory's module.
_spec = importlib.util.spec_from_file_location(
    "jaxlm_tests_model_reference", pathlib.Path(__file__).with_name("reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

VOCAB = 384


def model_cfg(family="llama", **overrides):
    cfg = config.defaults().model
    cfg.update(dict(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=2 if family == "llama" else 4, d_ff=48, max_seq_len=64,
                    dtype="float32", remat="none", scan_layers=True))
    cfg.update(overrides)
    return cfg


def split_params(model):
    graphdef, state = nnx.split(model)
    return graphdef, state, nnx.to_pure_dict(state)


def random_params(params, seed):
    """Random values for every parameter (only shapes are read): nonzero biases and
    non-unit norm scales (jaxlm initialises them to 0 and 1), and weights large enough that
    attention is far from uniform, so every term matters (tests/run_fixture.py)."""
    return run_fixture.random_params(params, seed)


def fast_jit(fn):
    """jax.jit with LLVM optimisation off: these tiny models compile about twice as fast,
    and the computation (HLO, remat included) is the same."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def jitted_forward(model):
    """model(tokens, positions, segment_ids) as one compiled function."""
    graphdef, state = nnx.split(model)
    fwd = fast_jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    return lambda *args: fwd(state, *args)


def abstract_model(cfg):
    """The model's structure without running its initialisers (fast: nothing compiles)."""
    return nnx.eval_shape(lambda: zoo.create(cfg, 0))


def make_model(cfg, seed=0):
    """A model of `cfg` with `random_params` (jaxlm's own parameter tree and layout)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, random_params(nnx.to_pure_dict(state), seed))
    return nnx.merge(graphdef, state)


def random_tokens(seed, shape):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape).astype(np.int32)


def assert_close_to_reference(logits, ref, mask=None):
    logits = np.asarray(logits, np.float64)
    if mask is not None:
        logits, ref = logits[mask], ref[mask]
    assert np.all(np.isfinite(ref))
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(logits - ref)))
    assert err <= 1e-4 * scale, f"max |jaxlm - reference| = {err:.3g} (logit scale {scale:.3g})"


# The reference configurations: llama with grouped-query (two groupings, one with a head_dim
# that is not d_model / n_heads), multi-query and multi-head attention, tied and untied
# heads, non-default thetas and an eps large enough to matter; GPT-2 tied and untied.
REFERENCE_CASES = {
    "llama_tied_gqa": dict(family="llama", rope_theta=500.0, norm_eps=1e-2),
    "llama_untied_gqa_headdim": dict(family="llama", tie_embeddings=False, head_dim=12,
                                     n_heads=6, n_kv_heads=3, rope_theta=10_000.0,
                                     norm_eps=1e-5),
    "llama_mqa": dict(family="llama", n_kv_heads=1, rope_theta=100.0, norm_eps=1e-3),
    "llama_mha": dict(family="llama", n_kv_heads=4, tie_embeddings=False),
    "gpt2_tied": dict(family="gpt2", norm_eps=1e-2),
    "gpt2_untied": dict(family="gpt2", tie_embeddings=False, norm_eps=1e-5),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_forward_matches_float64_reference(case):
    cfg = model_cfg(**REFERENCE_CASES[case])
    model = make_model(cfg, seed=len(case))
    params64 = reference.to_float64(split_params(model)[2])
    tokens = random_tokens(1, (2, 24))
    fwd = jitted_forward(model)

    logits = fwd(tokens)  # default positions 0..L-1
    assert logits.dtype == jnp.float32 and logits.shape == (2, 24, VOCAB)
    ref = np.stack([reference.forward_document(params64, cfg, row) for row in tokens])
    assert float(np.std(ref)) > 0.5  # random params give a nontrivial logit scale
    assert_close_to_reference(logits, ref)

    # Explicit positions (offset per row) are used per token: RoPE / the learned table.
    positions = np.stack([np.arange(24) + 3, np.arange(24) + 17]).astype(np.int32)
    logits = fwd(tokens, positions)
    ref = np.stack([reference.forward_document(params64, cfg, t, p)
                    for t, p in zip(tokens, positions)])
    assert_close_to_reference(logits, ref)


PACKED_SEGMENTS = np.array([
    [1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
], np.int32)


def doc_positions(segment_ids):
    """Positions restarting at 0 at each document start (padding gets 0, 1, ... too)."""
    pos = np.zeros_like(segment_ids)
    for r, row in enumerate(segment_ids):
        for i in range(1, len(row)):
            pos[r, i] = 0 if row[i] != row[i - 1] else pos[r, i - 1] + 1
    return pos


@pytest.mark.parametrize("case", ["llama_tied_gqa", "llama_untied_gqa_headdim", "gpt2_tied"])
def test_packed_batch_matches_per_document_reference(case):
    cfg = model_cfg(**REFERENCE_CASES[case])
    model = make_model(cfg, seed=7)
    params64 = reference.to_float64(split_params(model)[2])
    tokens = random_tokens(2, PACKED_SEGMENTS.shape)
    positions = doc_positions(PACKED_SEGMENTS)
    assert positions[0].tolist()[:7] == [0, 1, 2, 0, 1, 2, 3]

    logits = jitted_forward(model)(tokens, positions, PACKED_SEGMENTS)
    ref = reference.forward_packed(params64, cfg, tokens, positions, PACKED_SEGMENTS)
    assert_close_to_reference(logits, ref, mask=PACKED_SEGMENTS != 0)
    assert np.all(np.isfinite(np.asarray(logits)))  # padding rows too


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal(family):
    model = make_model(model_cfg(family), seed=3)
    fwd = jitted_forward(model)
    tokens = random_tokens(4, (1, 20))
    base = np.asarray(fwd(tokens))
    for t in (0, 1, 9, 19):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1 + t) % VOCAB
        out = np.asarray(fwd(changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])  # the change is seen from t on


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_documents_are_isolated(family):
    model = make_model(model_cfg(family), seed=5)
    fwd = jitted_forward(model)
    segs = np.array([[1] * 6 + [2] * 8 + [3] * 4 + [0] * 2], np.int32)
    pos = doc_positions(segs)
    doc1, doc2, doc3 = segs[0] == 1, segs[0] == 2, segs[0] == 3
    tokens = random_tokens(6, segs.shape)
    base = np.asarray(fwd(tokens, pos, segs))

    # Changing document 2 changes nothing in document 1 (earlier) nor 3 (later).
    changed = tokens.copy()
    changed[0, doc2] = random_tokens(7, int(doc2.sum()))
    out = np.asarray(fwd(changed, pos, segs))
    np.testing.assert_array_equal(out[0, doc1], base[0, doc1])
    np.testing.assert_array_equal(out[0, doc3], base[0, doc3])
    assert not np.allclose(out[0, doc2], base[0, doc2])

    # Changing document 1 leaves the later documents alone: only the document mask does this.
    changed = tokens.copy()
    changed[0, doc1] = random_tokens(8, int(doc1.sum()))
    out = np.asarray(fwd(changed, pos, segs))
    np.testing.assert_array_equal(out[0, doc2], base[0, doc2])
    np.testing.assert_array_equal(out[0, doc3], base[0, doc3])
    # ... whereas without segment ids the same change does leak into document 2.
    no_seg = np.asarray(fwd(tokens, pos, None))
    no_seg_changed = np.asarray(fwd(changed, pos, None))
    assert not np.allclose(no_seg_changed[0, doc2], no_seg[0, doc2])


def real_param_count(model):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(split_params(model)[2]))


@pytest.mark.parametrize("overrides", [
    dict(family="llama"),
    dict(family="llama", tie_embeddings=False),
    dict(family="llama", n_kv_heads=1, head_dim=12, n_layers=3),
    dict(family="llama", n_kv_heads=4, tie_embeddings=False, d_ff=40),
    dict(family="llama", qkv_bias=True, n_kv_heads=1, head_dim=12),
    dict(family="gpt2"),
    dict(family="gpt2", tie_embeddings=False, n_layers=3, max_seq_len=40),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_param_count(overrides):
    cfg = model_cfg(**overrides)
    model = abstract_model(cfg)
    assert zoo.param_count(cfg) == real_param_count(model)


REMAT_VARIANTS = {
    # Every combination for llama; for gpt2 (same layer / scan code, other block) a subset.
    "llama": [(scan, remat) for scan in (True, False) for remat in ("none", "full", "save_matmuls")],
    "gpt2": [(True, "none"), (True, "save_matmuls"), (False, "full")],
}


def _saved_residuals(fn, *args):
    """How many arrays the backward pass of fn keeps (public API: it prints one a line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ad_checkpoint.print_saved_residuals(fn, *args)
    return len(out.getvalue().splitlines())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scan_and_remat_are_equivalent(family):
    params = split_params(make_model(model_cfg(family), seed=11))[2]
    tokens = random_tokens(12, (2, 16))
    segs = np.array([[1] * 10 + [2] * 6, [1] * 16], np.int32)
    pos = doc_positions(segs)
    targets = random_tokens(13, (2, 16))

    results, residuals = {}, {}
    for scan, remat in REMAT_VARIANTS[family]:
        cfg = model_cfg(family, scan_layers=scan, remat=remat)
        graphdef, state = nnx.split(abstract_model(cfg))
        nnx.replace_by_pure_dict(state, params)

        def loss_fn(state, graphdef=graphdef):
            logits = nnx.merge(graphdef, state)(tokens, pos, segs)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

        (_, logits), grads = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
        results[scan, remat] = (np.asarray(logits), nnx.to_pure_dict(grads))
        if not scan:  # residuals of the unrolled layers (a scan hides them in its carry)
            residuals[remat] = _saved_residuals(lambda s: loss_fn(s)[0], state)

    ref_logits, ref_grads = results[True, "none"]
    flat_ref = [np.asarray(g) for g in jax.tree.leaves(ref_grads)]
    global_scale = max(float(np.max(np.abs(g))) for g in flat_ref)
    assert global_scale > 0
    logit_scale = float(np.max(np.abs(ref_logits)))
    for key, (logits, grads) in results.items():
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5 * logit_scale,
                                   err_msg=f"logits {key}")
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), flat_ref):
            # Some gradients are exactly zero in exact arithmetic (a key bias shifts every
            # score of a query equally): floor the scale so their rounding noise passes.
            scale = max(float(np.max(np.abs(g_ref))), 1e-3 * global_scale)
            np.testing.assert_allclose(np.asarray(g), g_ref, rtol=0, atol=1e-4 * scale,
                                       err_msg=f"grad {jax.tree_util.keystr(path)} {key}")

    # Remat really happens: full recomputation keeps the fewest activations.
    if "none" in residuals and "full" in residuals:
        assert residuals["full"] < residuals["none"], residuals
    if "save_matmuls" in residuals and "full" in residuals:
        assert residuals["full"] < residuals["save_matmuls"], residuals


def _variables(model):
    state = nnx.state(model)
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [(tuple(str(getattr(p, "key", p)) for p in path), v) for path, v in leaves]


@pytest.mark.parametrize("cfg_overrides", [
    # Sizes all distinct, so a logical name on the wrong dimension shows up as a size clash.
    dict(family="llama", n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12, d_model=40,
         d_ff=56, tie_embeddings=False),
    dict(family="gpt2", n_layers=3, n_heads=4, n_kv_heads=4, d_model=48, d_ff=56,
         tie_embeddings=False),
], ids=["llama", "gpt2"])
def test_sharding_annotations(cfg_overrides):
    cfg = model_cfg(**cfg_overrides)
    model = abstract_model(cfg)
    table = dict(rules.RULES)
    expected_size = {
        "vocab": cfg.vocab_size, "embed": cfg.d_model, "norm": cfg.d_model,
        "mlp": cfg.d_ff, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
        "head_dim": counts.head_dim(cfg), "positions": cfg.max_seq_len, "layers": cfg.n_layers,
    }
    variables = _variables(model)
    assert len(variables) == len(jax.tree.leaves(nnx.state(model)))
    seen = set()
    for path, v in variables:
        assert isinstance(v, nnx.Param), path
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None, f"{path} has no logical axes"
        axes = tuple(axes)
        assert len(axes) == len(v.shape), (path, axes, v.shape)
        stacked = path[0] == "blocks"
        assert (axes[0] == "layers") == stacked, (path, axes)
        assert "layers" not in axes[1:], (path, axes)
        for name, size in zip(axes, v.shape):
            assert name in table, f"{path}: logical axis {name!r} has no rule"
            assert expected_size[name] == size, (path, axes, v.shape)
            seen.add(name)
        rules.logical_to_spec(axes)  # resolvable
    must_see = {"vocab", "embed", "norm", "mlp", "heads", "head_dim", "layers"}
    if cfg.family == "gpt2":
        must_see.add("positions")
    else:
        must_see.add("kv_heads")
    assert must_see <= seen
