"""Weight-only quantized parameters (jaxlm/model/quantized.py) and the int8 KV cache
(jaxlm/model/kv_cache.py) against float64 NumPy: codes and scales as an independent
computation gives them; a quantized model's logits equal the float64 reference forward pass
on the weights its codes stand for; attention over an int8 cache equals float64 attention
over the keys and values its codes stand for."""

import importlib.util
import pathlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.model import attention, kv_cache, quantized, zoo

QMAX = {"int8": 127, "int4": 7}
FORMATS = [("int8", 0), ("int4", 32), ("nf4", 32)]


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parent / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load("jaxlm_tests_model_reference_q", "reference.py")


def np_quantize(w, fmt, group, axis):
    """(codes, scales as float64) of `w`, computed in float64: absmax / qmax per group
    (nf4: absmax), the scale rounded to its stored dtype first, codes rounded against it."""
    w = np.asarray(w, np.float64)
    axis %= w.ndim
    size = w.shape[axis]
    group = group or size
    grouped = w.reshape(w.shape[:axis] + (size // group, group) + w.shape[axis + 1:])
    scale = np.abs(grouped).max(axis=axis + 1) / (1.0 if fmt == "nf4" else QMAX[fmt])
    stored = np.float32 if group == size else ml_dtypes.bfloat16
    scale = scale.astype(stored).astype(np.float64)
    x = grouped / np.expand_dims(np.where(scale == 0, 1.0, scale), axis + 1)
    if fmt == "nf4":
        codes = np.abs(x[..., None] - quantized.NF4.astype(np.float64)).argmin(-1) - 8
    else:
        codes = np.clip(np.round(x), -QMAX[fmt], QMAX[fmt])
    return codes.reshape(w.shape).astype(np.int64), scale


def np_dequantize(codes, scale, fmt):
    """The float64 weight of codes (unpacked, in the weight's shape) and scales."""
    codes = np.asarray(codes).astype(np.int64)
    values = quantized.NF4.astype(np.float64)[codes + 8] if fmt == "nf4" else codes
    scale = np.asarray(scale).astype(np.float64)
    axis = next((i for i, (a, b) in enumerate(zip(codes.shape, scale.shape)) if a != b), None)
    return values * (scale if axis is None else np.repeat(scale, codes.shape[axis] //
                                                          scale.shape[axis], axis=axis))


def np_unpack(codes, fmt):
    codes = np.asarray(codes).astype(np.int64)
    if fmt == "int8":
        return codes
    return np.stack([(codes & 15) - 8, (codes >> 4) - 8], -1).reshape(
        codes.shape[:-1] + (2 * codes.shape[-1],))


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_codes_and_scales_equal_a_float64_computation(fmt, group, axis):
    w = np.random.default_rng(0).standard_normal((64, 32, 96)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero group: scale 0, codes 0, dequantized exactly 0
    codes, scale = quantized.quantize(jnp.asarray(w), fmt, group, axis)
    want_codes, want_scale = np_quantize(w, fmt, group, axis)
    if fmt == "int8":
        assert codes.dtype == jnp.int8 and codes.shape == w.shape
        np.testing.assert_array_equal(np.asarray(codes).astype(np.int64), want_codes)
    else:  # two codes a byte along the last axis: 2j in the low nibble, 2j + 1 in the high
        assert codes.dtype == jnp.uint8 and codes.shape == w.shape[:-1] + (w.shape[-1] // 2,)
        packed = np.asarray(codes).astype(np.int64)
        np.testing.assert_array_equal(packed & 15, want_codes[..., 0::2] + 8)
        np.testing.assert_array_equal(packed >> 4, want_codes[..., 1::2] + 8)
    # float32 scales: within an ulp (XLA divides by qmax as a multiplication)
    np.testing.assert_allclose(np.asarray(scale).astype(np.float64), want_scale, rtol=2.5e-7)
    back = np.asarray(quantized.dequantize(codes, scale, fmt))
    np.testing.assert_allclose(back, np_dequantize(want_codes, want_scale, fmt), rtol=1e-6)
    if fmt != "nf4":  # the rounding error is at most half a step (of the stored scale)
        steps = np.repeat(want_scale, w.shape[axis] // want_scale.shape[axis], axis=axis)
        assert np.all(np.abs(back - w) <= steps / 2 * (1 + 1e-5) + 1e-7)


def test_nf4_levels_are_the_normal_float_table():
    """16 increasing levels in [-1, 1] with -1, 0 and 1 exact: 7 below zero, 8 above."""
    levels = quantized.NF4
    assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
    assert (levels[0], levels[7], levels[15]) == (-1.0, 0.0, 1.0)


def small_model_cfg(family):
    cfg = config_lib.defaults().model
    cfg.update(family=family, vocab_size=128, d_model=64, n_layers=2, n_heads=2,
               n_kv_heads=1 if family == "llama" else 2, d_ff=128, max_seq_len=64,
               remat="none", tie_embeddings=family != "llama")
    return cfg


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantized_model_equals_float64_forward_on_its_dequantized_weights(family, fmt, group):
    """llama with an untied head, gpt2 with a tied one and a float position table."""
    cfg = small_model_cfg(family)
    float_params = nnx.to_pure_dict(nnx.state(zoo.create(cfg, seed=1)))
    qcfg = config_lib.defaults().model
    qcfg.update(cfg.to_dict())
    qcfg.update(weights=fmt, weight_group=group)
    model = zoo.create(qcfg, seed=1)  # the same draws, quantized
    params = nnx.to_pure_dict(nnx.state(model))
    dequantized = {}

    def walk(tree, out):
        for name, value in tree.items():
            if isinstance(value, dict):
                walk(value, out.setdefault(name, {}))
            elif name.endswith("_scale"):
                continue
            elif name + "_scale" in tree:
                out[name] = np_dequantize(np_unpack(value, fmt), tree[name + "_scale"], fmt)
            else:
                out[name] = np.asarray(value, np.float64)

    walk(params, dequantized)
    quantized_names = [n for n in quantized.GROUP_AXIS if n + "_scale" in
                       {**params, **params["blocks"]["attn"], **params["blocks"]["mlp"]}]
    assert len(quantized_names) == (9 if family == "llama" else 7)  # every projection + tables
    tokens = np.random.default_rng(2).integers(0, 128, size=40)
    got = np.asarray(model(jnp.asarray(tokens[None]))[0])
    want = reference.forward_document(dequantized, cfg, tokens)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    float_logits = reference.forward_document(reference.to_float64(float_params), cfg, tokens)
    assert np.abs(want - float_logits).max() > 1e-4  # the weights really were rounded


def test_int8_cache_attention_equals_float64_attention_over_its_codes():
    """cached_attention over int8 codes with per-slot, per-kv-head scales equals attention in
    float64 over codes x scales (the cache) and the new tokens' own keys and values."""
    rng = np.random.default_rng(3)
    b, length, h, g, t, k = 2, 3, 4, 2, 10, 16
    q = rng.standard_normal((b, length, h, k)).astype(np.float32)
    k_cache = rng.standard_normal((b, g, t, k)).astype(np.float32) * 2
    v_cache = rng.standard_normal((b, g, t, k)).astype(np.float32)
    k_new = rng.standard_normal((b, length, g, k)).astype(np.float32)
    v_new = rng.standard_normal((b, length, g, k)).astype(np.float32)
    k_codes, k_scale = kv_cache.quantize_int8(jnp.asarray(k_cache))
    v_codes, v_scale = kv_cache.quantize_int8(jnp.asarray(v_cache))
    np.testing.assert_allclose(np.asarray(k_scale), np.abs(k_cache).max(-1) / 127, rtol=2.5e-7)
    visible = np.arange(t)[None, :] < np.array([7, 10])[:, None]  # row 0: 7 slots written
    bias_cache = np.where(visible, 0.0, attention._MASKED)[:, None, None, :].repeat(
        length * h // g, 2).astype(np.float32)
    causal = np.tril(np.ones((length, length), bool))
    bias_new = np.where(causal, 0.0, attention._MASKED).repeat(h // g, 0)[None, None]
    got = np.asarray(kv_cache.cached_attention(
        jnp.asarray(q), k_codes, v_codes, jnp.asarray(k_new), jnp.asarray(v_new),
        (jnp.asarray(bias_cache), jnp.asarray(bias_new, jnp.float32)), k_scale, v_scale))
    k_deq = np.asarray(k_codes, np.float64) * np.asarray(k_scale, np.float64)[..., None]
    v_deq = np.asarray(v_codes, np.float64) * np.asarray(v_scale, np.float64)[..., None]
    assert np.abs(k_deq - k_cache).max() <= np.abs(k_cache).max() / 254 * 1.0001
    want = np.zeros((b, length, h, k))
    for row in range(b):
        for i in range(length):
            for head in range(h):
                kv = head // (h // g)
                keys = np.concatenate([k_deq[row, kv][visible[row]], k_new[row, :i + 1, kv]])
                values = np.concatenate([v_deq[row, kv][visible[row]], v_new[row, :i + 1, kv]])
                scores = keys @ q[row, i, head].astype(np.float64) / np.sqrt(k)
                weights = np.exp(scores - scores.max())
                want[row, i, head] = weights @ values / weights.sum()
    np.testing.assert_allclose(got, want, atol=2e-5)
