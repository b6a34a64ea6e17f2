"""The T5 network (jaxlm/model/t5.py) against an independent float64 NumPy reference written
from transformers' T5 description (it shares only the parameter layout); packed rows equal
their examples alone and do not depend on the examples' order; step-by-step generation
equals teacher forcing (and survives reordering rows); scan and remat variants agree; the
parameter count and logical axes. (Parity with transformers itself:
tests/convert/test_t5_parity.py.)"""

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
from jaxlm.model import t5, t5_layers, zoo
from jaxlm.parallel import rules

_spec = importlib.util.spec_from_file_location(
    "jaxlm_tests_model_reference", pathlib.Path(__file__).with_name("reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

VOCAB = 96
CASES = {  # T5 v1.0; v1.1 / Flan; a plain exact-GELU MLP with an untied head
    "v1_0_relu_tied": dict(activation="relu", gated_mlp=False, tie_embeddings=True),
    "v1_1_gated_untied": dict(activation="gelu_tanh", gated_mlp=True, tie_embeddings=False),
    "gelu_untied": dict(activation="gelu", gated_mlp=False, tie_embeddings=False),
}


def t5_cfg(case="v1_1_gated_untied", **overrides):
    """Odd sizes: H x K = 21 != d_model 24, 3 decoder layers over 2 encoder layers, 8
    buckets up to distance 20 (so the logarithmic buckets are used)."""
    cfg = config.defaults().model
    cfg.update(dict(family="t5", vocab_size=VOCAB, d_model=24, n_layers=2, n_decoder_layers=3,
                    n_heads=3, n_kv_heads=3, head_dim=7, d_ff=40, relative_buckets=8,
                    relative_max_distance=20, norm_eps=1e-6, dtype="float32", remat="none",
                    scan_layers=True, **CASES[case]))
    cfg.update(overrides)
    return cfg


def fast_jit(fn):
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def random_params(cfg, seed):
    """Projections std 0.16, norm scales 1 +- 0.3 (tests/run_fixture.py); the embedding,
    head and position-bias tables std 1, as T5 initialises them."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: zoo.create(cfg)))
    params = run_fixture.random_params(nnx.to_pure_dict(state), seed)
    for name in ("embed", "lm_head", "encoder_rel_bias", "decoder_rel_bias"):
        if name in params:
            params[name] = params[name] / 0.16
    return graphdef, state, params


def make_model(cfg, seed=0):
    graphdef, state, params = random_params(cfg, seed)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), params


def tokens(seed, shape):
    return np.random.default_rng(seed).integers(1, VOCAB, size=shape).astype(np.int32)


def forward(model):
    """model(inputs, decoder_inputs, **kwargs), jitted."""
    graphdef, state = nnx.split(model)
    fwd = fast_jit(lambda s, x, y, kw: nnx.merge(graphdef, s)(x, y, **kw))
    return lambda x, y, **kw: np.asarray(fwd(state, x, y, kw))


# ---- the float64 reference -------------------------------------------------------------------

def ref_buckets(rel, bidirectional, num_buckets, max_distance):
    """transformers' _relative_position_bucket in NumPy (float32 logarithm, as it computes)."""
    rel = rel.astype(np.int64)
    out = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0): a small distance anyway
        log = np.log(rel.astype(np.float32) / np.float32(exact)) / np.float32(
            math.log(max_distance / exact))
        large = np.minimum(exact + (log * np.float32(num_buckets - exact)).astype(np.int64),
                           num_buckets - 1)
    return out + np.where(rel < exact, rel, large)


def ref_activation(name, x):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu_tanh":
        return reference.gelu_tanh(x)
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_attention(a, xq_LxD, xkv_MxD, bias_HxLxM, visible_LxM):
    q = np.einsum("ld,dhk->hlk", xq_LxD, a["wq"])
    k = np.einsum("md,dhk->hmk", xkv_MxD, a["wk"])
    v = np.einsum("md,dhk->hmk", xkv_MxD, a["wv"])
    scores = np.einsum("hlk,hmk->hlm", q, k) + (0.0 if bias_HxLxM is None else bias_HxLxM)
    scores = np.where(visible_LxM[None], scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("lhk,hkd->ld", np.einsum("hlm,hmk->lhk", w, v), a["wo"])


def ref_mlp(m, x, cfg):
    if cfg.gated_mlp:
        return (ref_activation(cfg.activation, x @ m["w_gate"]) * (x @ m["w_up"])) @ m["w_down"]
    return ref_activation(cfg.activation, x @ m["w_in"]) @ m["w_out"]


def ref_bias(table_PxH, length, bidirectional, cfg):
    pos = np.arange(length)
    buckets = ref_buckets(pos[None, :] - pos[:, None], bidirectional, cfg.relative_buckets,
                          cfg.relative_max_distance)
    return table_PxH[buckets].transpose(2, 0, 1)


def ref_logits(params, cfg, enc_S, dec_T, enc_valid_S):
    """One example: T x V float64 logits; padded encoder keys are masked (as transformers'
    attention_mask does)."""
    p = reference.to_float64(params)
    eps, layer = cfg.norm_eps, (lambda tree, i: {k: v[i] for k, v in tree.items()})
    s, t = len(enc_S), len(dec_T)
    x = p["embed"][enc_S]
    bias = ref_bias(p["encoder_rel_bias"], s, True, cfg)
    keys = np.broadcast_to(enc_valid_S[None, :], (s, s))
    for i in range(cfg.n_layers):
        b = {k: layer(v, i) for k, v in p["encoder_blocks"].items()}
        h = reference.rms_norm(x, b["attn_norm"]["scale"], eps)
        x = x + ref_attention(b["attn"], h, h, bias, keys)
        x = x + ref_mlp(b["mlp"], reference.rms_norm(x, b["mlp_norm"]["scale"], eps), cfg)
    enc = reference.rms_norm(x, p["encoder_norm"]["scale"], eps)

    y = p["embed"][dec_T]
    bias = ref_bias(p["decoder_rel_bias"], t, False, cfg)
    causal = np.tril(np.ones((t, t), bool))
    cross = np.broadcast_to(enc_valid_S[None, :], (t, s))
    for i in range(zoo.decoder_layers(cfg)):
        b = {k: layer(v, i) for k, v in p["decoder_blocks"].items()}
        h = reference.rms_norm(y, b["attn_norm"]["scale"], eps)
        y = y + ref_attention(b["attn"], h, h, bias, causal)
        h = reference.rms_norm(y, b["cross_norm"]["scale"], eps)
        y = y + ref_attention(b["cross_attn"], h, enc, None, cross)
        y = y + ref_mlp(b["mlp"], reference.rms_norm(y, b["mlp_norm"]["scale"], eps), cfg)
    y = reference.rms_norm(y, p["decoder_norm"]["scale"], eps)
    if cfg.tie_embeddings:
        return (y * cfg.d_model ** -0.5) @ p["embed"].T, enc
    return y @ p["lm_head"], enc


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_float64_reference(case):
    """Encoder inputs with padding (row 1: 9 of 14 tokens real), decoder inputs of 11."""
    cfg = t5_cfg(case)
    model, params = make_model(cfg, seed=1)
    enc, dec = tokens(2, (2, 14)), tokens(3, (2, 11))
    segs = np.ones((2, 14), np.int32)
    segs[1, 9:] = 0
    logits = forward(model)(enc, dec, input_segment_ids=segs)
    encoded = np.asarray(fast_jit(lambda x, m: model.encode(x, segment_ids_BxS=m))(enc, segs))
    for row in range(2):
        valid = segs[row] == 1
        ref, ref_enc = ref_logits(params, cfg, enc[row], dec[row], valid)
        assert float(np.std(ref)) > 0.5  # far from uniform: every term matters
        np.testing.assert_allclose(logits[row], ref, rtol=0, atol=1e-4)
        np.testing.assert_allclose(encoded[row][valid], ref_enc[valid], rtol=0, atol=1e-4)


def pack(examples, enc_len, dec_len):
    """Rows of packed examples ((enc, dec) pairs), each row a list of examples: tokens,
    segment ids 1, 2, ... (0 = padding) and positions restarting per example, for the
    encoder and the decoder."""
    out = {k: np.zeros((len(examples), n), np.int32) for k, n in (
        ("enc", enc_len), ("enc_seg", enc_len), ("enc_pos", enc_len),
        ("dec", dec_len), ("dec_seg", dec_len), ("dec_pos", dec_len))}
    for r, row in enumerate(examples):
        starts = {"enc": 0, "dec": 0}
        for seg, pair in enumerate(row, start=1):
            for side, ids in zip(("enc", "dec"), pair):
                a, n = starts[side], len(ids)
                out[side][r, a:a + n] = ids
                out[side + "_seg"][r, a:a + n] = seg
                out[side + "_pos"][r, a:a + n] = np.arange(n)
                starts[side] += n
    return out


def packed_logits(fwd, batch):
    return fwd(batch["enc"], batch["dec"], input_positions=batch["enc_pos"],
               input_segment_ids=batch["enc_seg"], decoder_positions=batch["dec_pos"],
               decoder_segment_ids=batch["dec_seg"])


EXAMPLES = [(tokens(10 + i, (n,)), tokens(20 + i, (m,))) for i, (n, m) in
            enumerate([(9, 7), (5, 4), (12, 9), (3, 2)])]


def test_packed_rows_equal_examples_alone():
    cfg = t5_cfg()
    model, _ = make_model(cfg, seed=4)
    fwd = forward(model)
    rows = [[EXAMPLES[0], EXAMPLES[1], EXAMPLES[3]], [EXAMPLES[2]]]
    logits = packed_logits(fwd, pack(rows, enc_len=19, dec_len=14))
    scale = 0.0
    for r, row in enumerate(rows):
        start = 0
        for enc, dec in row:
            alone = fwd(enc[None], dec[None])[0]
            scale = max(scale, float(np.abs(alone).max()))
            np.testing.assert_allclose(logits[r, start:start + len(dec)], alone, rtol=0,
                                       atol=2e-5 * np.abs(alone).max())
            start += len(dec)
    assert scale > 1.0


def test_packed_rows_do_not_depend_on_example_order():
    cfg = t5_cfg("v1_0_relu_tied")
    model, _ = make_model(cfg, seed=5)
    fwd = forward(model)
    a, b, c = EXAMPLES[0], EXAMPLES[1], EXAMPLES[2]
    first = packed_logits(fwd, pack([[a, b, c]], enc_len=30, dec_len=22))[0]
    second = packed_logits(fwd, pack([[c, a, b]], enc_len=30, dec_len=22))[0]
    lengths = [len(a[1]), len(b[1]), len(c[1])]
    pieces = np.split(first[:sum(lengths)], np.cumsum(lengths)[:-1])
    moved = np.split(second[:sum(lengths)], np.cumsum([lengths[2], lengths[0]]))
    for x, y in zip(pieces, [moved[1], moved[2], moved[0]]):
        np.testing.assert_allclose(x, y, rtol=0, atol=2e-5 * np.abs(x).max())


@pytest.mark.parametrize("case", ["v1_0_relu_tied", "v1_1_gated_untied"])
def test_step_by_step_decoding_equals_teacher_forcing(case):
    """Steps of 1, 3 and 1 tokens over an encoder with padding equal `decode` on the whole
    sequence; `select_rows` then reorders (and repeats) rows mid-sequence. Both ways of
    running the decoder's layers: a scan over the stacked parameters (layers=None), and a
    loop over them apart (`unstack_decoder`, generation's way): the same cache and logits."""
    cfg = t5_cfg(case)
    model, params = make_model(cfg, seed=6)
    graphdef, state = nnx.split(model)
    layers = t5.unstack_decoder(params)[1]
    enc, dec = tokens(30, (2, 10)), tokens(31, (2, 9))
    segs = np.ones((2, 10), np.int32)
    segs[0, 6:] = 0
    run = lambda f: fast_jit(lambda s, *a: f(nnx.merge(graphdef, s), *a))
    encode = run(lambda m, x, g: m.encode(x, segment_ids_BxS=g))
    decode = run(lambda m, y, e, g: m.decode(y, e, enc_segment_ids_BxS=g))
    init = run(lambda m, e, g, ls: m.init_cache(e, g, 12, layers=ls))
    step = run(lambda m, y, c, ls: m.decode_step(y, c, layers=ls))
    enc_out = encode(state, enc, segs)
    full = np.asarray(decode(state, dec, enc_out, segs))
    atol = 1e-5 * np.abs(full).max()

    results = {}
    for way, ls in (("scan", None), ("apart", layers)):
        cache = init(state, enc_out, segs, ls)
        assert cache.k.shape == (3, 2, 3, 12, 7) and cache.cross_k.shape == (3, 2, 3, 10, 7)
        outs = []
        for a, b in ((0, 1), (1, 4), (4, 5)):
            logits, cache = step(state, dec[:, a:b], cache, ls)
            outs.append(np.asarray(logits))
        stepped = np.concatenate(outs, axis=1)
        np.testing.assert_allclose(stepped, full[:, :5], rtol=0, atol=atol, err_msg=way)
        assert int(cache.index) == 5

        rows = np.array([1, 0, 1])
        cache = t5.select_rows(cache, jnp.asarray(rows))
        for t in range(5, 9):
            logits, cache = step(state, dec[rows, t:t + 1], cache, ls)
            outs.append(np.asarray(logits))
        np.testing.assert_allclose(np.concatenate(outs[3:], axis=1), full[rows, 5:], rtol=0,
                                   atol=atol, err_msg=way)
        results[way] = outs, jax.device_get(cache)
    for a, b in zip(results["scan"][0], results["apart"][0]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(full).max())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                 results["scan"][1], results["apart"][1])
    # The layers given are what runs: the last layer's MLP zeroed changes the logits.
    zeroed = layers[:-1] + (dict(layers[-1], mlp=jax.tree.map(jnp.zeros_like,
                                                                layers[-1]["mlp"])),)
    logits, _ = step(state, dec[:, :1], init(state, enc_out, segs, zeroed), zeroed)
    assert np.abs(np.asarray(logits) - full[:, :1]).max() > 100 * atol


def test_unstack_and_restack_decoder():
    """unstack_decoder: each decoder layer's slice of every stacked array (none of the
    other parameters); restack_decoder gives the tree back, bit for bit."""
    cfg = t5_cfg("v1_0_relu_tied")
    _, _, params = random_params(cfg, seed=8)
    rest, layers = t5.unstack_decoder(params)
    assert "decoder_blocks" not in rest and set(rest) | {"decoder_blocks"} == set(params)
    assert len(layers) == 3
    for i, layer in enumerate(layers):
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a, np.asarray(b)[i]),
                     layer, params["decoder_blocks"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)),
                 t5.restack_decoder(rest, layers), params)


VARIANTS = [(True, "none"), (True, "full"), (True, "save_matmuls"), (False, "none"),
            (False, "full")]


def test_scan_and_remat_are_equivalent():
    """Logits and gradients of every parameter (packed rows) agree across model.scan_layers
    and model.remat."""
    _, _, params = random_params(t5_cfg(), seed=7)
    batch = pack([[EXAMPLES[0], EXAMPLES[1]], [EXAMPLES[2]]], enc_len=15, dec_len=12)
    targets = tokens(40, (2, 12))
    results = {}
    for scan, remat in VARIANTS:
        cfg = t5_cfg(scan_layers=scan, remat=remat)
        graphdef, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: zoo.create(cfg)))
        nnx.replace_by_pure_dict(state, params)

        def loss_fn(state, graphdef=graphdef):
            logits = packed_logits(lambda x, y, **kw: nnx.merge(graphdef, state)(x, y, **kw),
                                   batch)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

        (_, logits), grads = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
        results[scan, remat] = (np.asarray(logits), nnx.to_pure_dict(grads))
    ref_logits_, ref_grads = results[True, "none"]
    flat_ref = jax.tree.leaves(ref_grads)
    global_scale = max(float(np.abs(g).max()) for g in flat_ref)
    for key, (logits, grads) in results.items():
        np.testing.assert_allclose(logits, ref_logits_, rtol=0,
                                   atol=1e-5 * np.abs(ref_logits_).max(), err_msg=str(key))
        for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), flat_ref):
            scale = max(float(np.abs(g_ref).max()), 1e-3 * global_scale)
            np.testing.assert_allclose(np.asarray(g), g_ref, rtol=0, atol=1e-4 * scale,
                                       err_msg=f"{jax.tree_util.keystr(path)} {key}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_param_count_and_tree(case):
    cfg = t5_cfg(case)
    _, state = nnx.split(nnx.eval_shape(lambda: zoo.create(cfg)))
    assert zoo.param_count(cfg) == sum(x.size for x in jax.tree.leaves(state))
    top = set(nnx.to_pure_dict(state))
    assert top == {"embed", "encoder_blocks", "encoder_rel_bias", "encoder_norm",
                   "decoder_blocks", "decoder_rel_bias", "decoder_norm"} | (
        set() if cfg.tie_embeddings else {"lm_head"})


def test_logical_axes():
    """Every parameter names one known logical axis per dimension; stacks lead with
    "layers"; attention as jaxlm.model.attention.Attention."""
    cfg = t5_cfg()
    _, state = nnx.split(nnx.eval_shape(lambda: zoo.create(cfg)))
    axes = rules.axes_of(state)
    shapes = nnx.to_pure_dict(state)
    table = dict(rules.RULES)
    for path, names in jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x:
                                                           isinstance(x, tuple)):
        shape = shapes
        for p in path:
            shape = shape[p.key]
        assert len(names) == len(shape.shape) and all(n in table for n in names), path
    assert axes["encoder_rel_bias"] == ("positions", "heads")
    assert axes["decoder_blocks"]["cross_attn"]["wo"] == ("layers", "heads", "head_dim", "embed")
    assert axes["encoder_blocks"]["mlp"]["w_gate"] == ("layers", "embed", "mlp")
    assert axes["lm_head"] == ("embed", "vocab")


def test_relative_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = np.arange(-400, 401)
    for num_buckets, max_distance in ((32, 128), (8, 20), (16, 64), (7, 33)):
        for bidirectional in (True, False):
            expected = modeling.T5Attention._relative_position_bucket(
                torch.as_tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
                max_distance=max_distance).numpy()
            ours = t5_layers.relative_buckets(jnp.asarray(rel), bidirectional=bidirectional,
                                              num_buckets=num_buckets, max_distance=max_distance)
            np.testing.assert_array_equal(np.asarray(ours), expected)
            np.testing.assert_array_equal(
                ref_buckets(rel, bidirectional, num_buckets, max_distance), expected)


@pytest.mark.parametrize("overrides,key", [
    (dict(attention="cudnn"), "config.model.attention"),
    (dict(relative_buckets=3), "config.model.relative_buckets"),
    (dict(relative_max_distance=4), "config.model.relative_max_distance"),
])
def test_bad_config_is_one_clear_error(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        zoo.validate(t5_cfg(**overrides))
