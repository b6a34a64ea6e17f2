"""The bert family (BERT / RoBERTa encoder) against an independent float64 NumPy reference
written here from the architecture (Hugging Face modeling_bert: post-LayerNorm blocks,
bidirectional attention, masked-LM head tied to the embedding), plus packed documents,
scan/remat equivalence, parameter count and sharding annotations."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from flax import nnx

from jaxlm import config
from jaxlm.errors import ConfigError
from jaxlm.model import counts, zoo
from jaxlm.parallel import rules

_spec = importlib.util.spec_from_file_location(
    "jaxlm_tests_model_reference", pathlib.Path(__file__).with_name("reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

VOCAB = 99


def model_cfg(**overrides):
    cfg = config.defaults().model
    cfg.update(dict(family="bert", vocab_size=VOCAB, d_model=36, n_layers=2, n_heads=3,
                    n_kv_heads=3, d_ff=52, max_seq_len=40, dtype="float32", remat="none",
                    scan_layers=True, norm_eps=1e-3, activation="gelu"))
    cfg.update(overrides)
    zoo.validate(cfg)
    return cfg


def fast_jit(fn):
    """jax.jit with LLVM optimisation off: tiny models compile faster, same computation."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def abstract_model(cfg):
    return nnx.eval_shape(lambda: zoo.create(cfg, 0))


def make_model(cfg, seed=0):
    """A model of `cfg` with random values everywhere (nonzero biases, non-unit scales)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, run_fixture.random_params(nnx.to_pure_dict(state), seed))
    return nnx.merge(graphdef, state)


def params64(model):
    return reference.to_float64(nnx.to_pure_dict(nnx.state(model)))


def jitted(model, method="__call__"):
    graphdef, state = nnx.split(model)
    fwd = fast_jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
    return lambda *args: np.asarray(fwd(state, *args), np.float64)


def random_tokens(seed, shape, high=VOCAB):
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(np.int32)


# ---- the float64 reference ---------------------------------------------------------------

_erf = np.vectorize(math.erf)
ACT = {"gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
       "gelu_tanh": reference.gelu_tanh, "relu": lambda x: np.maximum(x, 0.0)}


def reference_hidden(p, cfg, tokens_L, types_L, positions_L):
    """One document, every position attending to every other: the last layer's output."""
    ln = reference.layer_norm
    eps, act = cfg.norm_eps, ACT[cfg.activation]
    x = (p["embed"][tokens_L] + p["type_embed"][types_L]
         + p["pos_embed"][positions_L + cfg.position_offset])
    x = ln(x, p["embed_norm"]["scale"], p["embed_norm"]["bias"], eps)
    b = p["blocks"]
    for i in range(cfg.n_layers):
        a = {k: v[i] for k, v in b["attn"].items()}
        q = np.einsum("ld,dhk->lhk", x, a["wq"]) + a["bq"]
        k = np.einsum("ld,dhk->lhk", x, a["wk"]) + a["bk"]
        v = np.einsum("ld,dhk->lhk", x, a["wv"]) + a["bv"]
        scores = np.einsum("qhk,mhk->hqm", q, k) / math.sqrt(q.shape[-1])
        o = np.einsum("hqm,mhk->qhk", reference.softmax(scores), v)
        attn = np.einsum("qhk,hkd->qd", o, a["wo"]) + a["bo"]
        x = ln(x + attn, b["attn_norm"]["scale"][i], b["attn_norm"]["bias"][i], eps)
        m = {k: v[i] for k, v in b["mlp"].items()}
        h = act(x @ m["w_in"] + m["b_in"]) @ m["w_out"] + m["b_out"]
        x = ln(x + h, b["mlp_norm"]["scale"][i], b["mlp_norm"]["bias"][i], eps)
    return x


def reference_logits(p, cfg, hidden_LxD):
    h = ACT[cfg.activation](hidden_LxD @ p["head_dense"] + p["head_bias"])
    h = reference.layer_norm(h, p["head_norm"]["scale"], p["head_norm"]["bias"], cfg.norm_eps)
    return h @ p["embed"].T + p["out_bias"]


def reference_packed(p, cfg, tokens, types, positions, segments, out="logits"):
    """Every document of every row on its own (0 = padding: left as NaN)."""
    result = np.full(tokens.shape + ((VOCAB if out == "logits" else cfg.d_model),), np.nan)
    for r in range(tokens.shape[0]):
        for s in set(segments[r].tolist()) - {0}:
            idx = segments[r] == s
            hidden = reference_hidden(p, cfg, tokens[r, idx], types[r, idx], positions[r, idx])
            result[r, idx] = reference_logits(p, cfg, hidden) if out == "logits" else hidden
    return result


def assert_close(actual, expected, mask=None, tol=1e-4):
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    assert np.all(np.isfinite(expected))
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol * scale, f"max |jaxlm - reference| = {err:.3g} (scale {scale:.3g})"


# BERT (exact GELU, two token types), RoBERTa (positions from row 2, one token type, the
# tanh GELU) and a ReLU encoder with more token types.
CASES = {
    "bert": dict(),
    "roberta_tanh": dict(position_offset=2, type_vocab_size=1, activation="gelu_tanh",
                         norm_eps=1e-5),
    "relu_types3": dict(activation="relu", type_vocab_size=3, n_heads=4, n_kv_heads=4,
                        d_model=32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64_reference(case):
    cfg = model_cfg(**CASES[case])
    model = make_model(cfg, seed=len(case))
    p = params64(model)
    length = cfg.max_seq_len - cfg.position_offset  # every row of the position table used
    tokens = random_tokens(1, (2, length))
    types = random_tokens(2, (2, length), high=cfg.type_vocab_size)
    zeros = np.zeros_like(types)
    ref = np.stack([reference_logits(p, cfg, reference_hidden(p, cfg, t, z, np.arange(length)))
                    for t, z in zip(tokens, zeros)])
    assert float(np.std(ref)) > 0.5  # random weights: a nontrivial logit scale
    fwd = jitted(model)
    logits = fwd(tokens)  # positions 0..L-1, token type 0
    assert logits.shape == (2, length, VOCAB)
    assert_close(logits, ref)

    # Explicit positions and token types are read per token.
    positions = np.stack([np.arange(10) + 3, np.arange(10)[::-1] + 20]).astype(np.int32)
    hidden = jitted(model, "hidden_states")(tokens[:, :10], positions, None, types[:, :10])
    ref_hidden = np.stack([reference_hidden(p, cfg, t, y, q) for t, y, q in
                           zip(tokens[:, :10], types[:, :10], positions)])
    assert hidden.shape == (2, 10, cfg.d_model)
    assert_close(hidden, ref_hidden)
    logits = fwd(tokens[:, :10], positions, None, types[:, :10])
    assert_close(logits, np.stack([reference_logits(p, cfg, h) for h in ref_hidden]))


PACKED_SEGMENTS = np.array([
    [1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
], np.int32)


def doc_positions(segment_ids):
    """Positions restarting at 0 at each document start (padding counts on, as the
    pipeline leaves it)."""
    pos = np.zeros_like(segment_ids)
    for r, row in enumerate(segment_ids):
        for i in range(1, len(row)):
            pos[r, i] = 0 if row[i] != row[i - 1] else pos[r, i - 1] + 1
    return pos


@pytest.mark.parametrize("case", ["bert", "roberta_tanh"])
def test_packed_rows_equal_each_document_alone(case):
    cfg = model_cfg(**CASES[case])
    model = make_model(cfg, seed=7)
    p = params64(model)
    tokens = random_tokens(3, PACKED_SEGMENTS.shape)
    types = random_tokens(4, PACKED_SEGMENTS.shape, high=cfg.type_vocab_size)
    positions = doc_positions(PACKED_SEGMENTS)
    fwd = jitted(model)
    logits = fwd(tokens, positions, PACKED_SEGMENTS, types)
    assert np.all(np.isfinite(logits))  # padding rows too
    real = PACKED_SEGMENTS != 0
    assert_close(logits, reference_packed(p, cfg, tokens, types, positions, PACKED_SEGMENTS),
                 mask=real)
    # ... and equal to the model run on each document alone, unpacked.
    for r, s in [(0, 2), (1, 1), (1, 3), (1, 4), (2, 1)]:
        idx = PACKED_SEGMENTS[r] == s
        alone = fwd(tokens[r:r + 1, idx], None, None, types[r:r + 1, idx])
        np.testing.assert_allclose(logits[r, idx], alone[0], rtol=0, atol=1e-5)


def test_a_document_is_invariant_to_the_other_documents_in_its_row():
    """Bidirectional attention sees every position of the document, and only those: the
    documents before and after it (their tokens, lengths and order) change nothing."""
    cfg = model_cfg()
    fwd = jitted(make_model(cfg, seed=5))
    docs = [random_tokens(10 + i, (n,)) for i, n in enumerate((5, 7, 3))]

    def row(order):
        tokens = np.concatenate([docs[i] for i in order] + [np.zeros(1, np.int32)])[None]
        segs = np.concatenate([np.full(len(docs[i]), j + 1) for j, i in enumerate(order)]
                              + [np.zeros(1)]).astype(np.int32)[None]
        out = fwd(tokens, doc_positions(segs), segs)
        starts = np.cumsum([0] + [len(docs[i]) for i in order])
        return {i: out[0, starts[j]:starts[j + 1]] for j, i in enumerate(order)}

    base = row((0, 1, 2))
    for order in ((2, 1, 0), (1, 2, 0)):
        other = row(order)
        for i in range(3):
            np.testing.assert_allclose(other[i], base[i], rtol=0, atol=1e-5)

    # Within a document every output sees every token: a change at the end reaches the start.
    tokens = np.concatenate(docs)[None]
    changed = tokens.copy()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    assert not np.allclose(fwd(tokens)[0, 0], fwd(changed)[0, 0])


def test_scan_and_remat_are_equivalent():
    cfg = model_cfg(n_layers=3)
    params = nnx.to_pure_dict(nnx.state(make_model(cfg, seed=11)))
    tokens = random_tokens(12, (2, 16))
    segs = np.array([[1] * 10 + [2] * 6, [1] * 16], np.int32)
    pos = doc_positions(segs)
    targets = random_tokens(13, (2, 16))

    results = {}
    for scan, remat in [(True, "none"), (True, "full"), (False, "save_matmuls"),
                        (False, "none")]:
        graphdef, state = nnx.split(abstract_model(model_cfg(n_layers=3, scan_layers=scan,
                                                             remat=remat)))
        nnx.replace_by_pure_dict(state, params)

        def loss_fn(state, graphdef=graphdef):
            logits = nnx.merge(graphdef, state)(tokens, pos, segs)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

        (_, logits), grads = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
        results[scan, remat] = (np.asarray(logits), nnx.to_pure_dict(grads))

    ref_logits, ref_grads = results[True, "none"]
    flat_ref = [np.asarray(g) for g in jax.tree.leaves(ref_grads)]
    global_scale = max(float(np.max(np.abs(g))) for g in flat_ref)
    assert global_scale > 0
    for key, (logits, grads) in results.items():
        np.testing.assert_allclose(logits, ref_logits, rtol=0,
                                   atol=1e-5 * float(np.max(np.abs(ref_logits))),
                                   err_msg=f"logits {key}")
        for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), flat_ref):
            # A key bias shifts every score of a query equally: its gradient is zero in
            # exact arithmetic, so floor the scale for its rounding noise.
            scale = max(float(np.max(np.abs(g_ref))), 1e-3 * global_scale)
            np.testing.assert_allclose(np.asarray(g), g_ref, rtol=0, atol=1e-4 * scale,
                                       err_msg=f"grad {jax.tree_util.keystr(path)} {key}")


@pytest.mark.parametrize("overrides", [
    dict(), dict(position_offset=2, type_vocab_size=1, max_seq_len=34),
    dict(n_layers=3, n_heads=4, n_kv_heads=4, head_dim=5, d_ff=20, type_vocab_size=4)],
    ids=["bert", "roberta", "head_dim"])
def test_param_count_equals_the_built_model(overrides):
    cfg = model_cfg(**overrides)
    state = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
    assert zoo.param_count(cfg) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state))


def test_sharding_annotations():
    """Every parameter names its logical axes, each of the size it says; the axes without a
    name (replicated) are the token-type rows (a few) and the head transform's output (its
    input is the sharded embed axis)."""
    cfg = model_cfg(n_layers=3, n_heads=4, n_kv_heads=4, head_dim=10, d_model=44, d_ff=56,
                    type_vocab_size=3)
    state = nnx.state(abstract_model(cfg))
    size = {"vocab": cfg.vocab_size, "embed": cfg.d_model, "norm": cfg.d_model,
            "mlp": cfg.d_ff, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "head_dim": counts.head_dim(cfg), "positions": cfg.max_seq_len,
            "layers": cfg.n_layers}
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=rules.is_variable)
    for path, v in leaves:
        name = jax.tree_util.keystr(path)
        axes = rules.variable_axes(v)
        assert isinstance(v, nnx.Param) and len(axes) == len(v.shape), name
        assert (axes[0] == "layers") == name.startswith("['blocks']"), name
        for axis, n in zip(axes, v.shape):
            if axis is None:
                assert (name, n) in {("['type_embed']", cfg.type_vocab_size),
                                     ("['head_dense']", cfg.d_model)}, name
            else:
                assert size[axis] == n, (name, axes, v.shape)
        rules.logical_to_spec(axes)  # resolvable


def test_too_long_for_the_position_table_is_one_clear_error():
    cfg = model_cfg(position_offset=2, type_vocab_size=1, max_seq_len=20)
    fwd = jitted(make_model(cfg))
    assert fwd(random_tokens(0, (1, 18))).shape == (1, 18, VOCAB)
    with pytest.raises(ConfigError, match=r"config\.model\.max_seq_len: 19 positions from "
                                          r"offset 2 .* need 21 rows .* it has 20"):
        fwd(random_tokens(0, (1, 19)))
