"""An independent float64 NumPy forward pass of the two model families.

Written from the architecture descriptions (LLaMA as in Hugging Face `modeling_llama`,
GPT-2 as in the OpenAI release), not from jaxlm code: it only shares the parameter layout.

Parameters come as the nested dict of `nnx.to_pure_dict(nnx.state(model))`:
stacked block parameters carry a leading layer axis; weight layouts are
    embed (V, D), pos_embed (P, D), lm_head (D, V)
    attn.wq (D, H, K), attn.wk / attn.wv (D, G, K), attn.wo (H, K, D),
    attn.bq (H, K), attn.bk / attn.bv (G, K), attn.bo (D,)
    mlp.w_gate / mlp.w_up (D, F), mlp.w_down (F, D)             (llama)
    mlp.w_in (D, F), mlp.b_in (F,), mlp.w_out (F, D), mlp.b_out (D,)   (gpt2)
    *_norm.scale (D,), *_norm.bias (D,)
"""

from __future__ import annotations

import math

import numpy as np


def to_float64(tree):
    """Nested dict of arrays -> nested dict of float64 NumPy arrays."""
    if isinstance(tree, dict):
        return {k: to_float64(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float64)


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def layer_norm(x, scale, bias, eps):
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x_LxNxK, positions_L, theta):
    """HF LLaMA: cos/sin of cat(freqs, freqs); x * cos + rotate_half(x) * sin."""
    k = x_LxNxK.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, k, 2, dtype=np.float64) / k)
    freqs_Lxk = positions_L.astype(np.float64)[:, None] * inv_freq[None, :]
    emb_LxK = np.concatenate([freqs_Lxk, freqs_Lxk], axis=-1)
    cos, sin = np.cos(emb_LxK)[:, None, :], np.sin(emb_LxK)[:, None, :]
    return x_LxNxK * cos + rotate_half(x_LxNxK) * sin


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def causal_attention(q_LxHxK, k_LxGxK, v_LxGxK):
    """One document, grouped-query: query head h reads key/value head h // (H / G)."""
    length, n_heads, kd = q_LxHxK.shape
    n_kv = k_LxGxK.shape[1]
    group = n_heads // n_kv
    causal = np.tril(np.ones((length, length), dtype=bool))
    out = np.zeros_like(q_LxHxK)
    for h in range(n_heads):
        g = h // group
        scores = q_LxHxK[:, h, :] @ k_LxGxK[:, g, :].T / math.sqrt(kd)
        scores = np.where(causal, scores, -np.inf)
        out[:, h, :] = softmax(scores) @ v_LxGxK[:, g, :]
    return out


def _layer(params, i):
    return {k: (_layer(v, i) if isinstance(v, dict) else v[i]) for k, v in params.items()}


def forward_document(params, cfg, tokens_L, positions_L=None):
    """Logits (L x V) of one document (no packing) with float64 arithmetic."""
    tokens_L = np.asarray(tokens_L)
    length = tokens_L.shape[0]
    positions_L = np.arange(length) if positions_L is None else np.asarray(positions_L)
    llama = cfg.family == "llama"
    eps = cfg.norm_eps

    def norm(p, x):
        return rms_norm(x, p["scale"], eps) if llama else layer_norm(x, p["scale"], p["bias"], eps)

    x = params["embed"][tokens_L]
    if not llama:
        x = x + params["pos_embed"][positions_L]
    for i in range(cfg.n_layers):
        p = _layer(params["blocks"], i)
        a = p["attn"]
        h = norm(p["attn_norm"], x)
        q = np.einsum("ld,dhk->lhk", h, a["wq"])
        k = np.einsum("ld,dgk->lgk", h, a["wk"])
        v = np.einsum("ld,dgk->lgk", h, a["wv"])
        if not llama:
            q, k, v = q + a["bq"], k + a["bk"], v + a["bv"]
        else:
            q = rope(q, positions_L, cfg.rope_theta)
            k = rope(k, positions_L, cfg.rope_theta)
        o = np.einsum("lhk,hkd->ld", causal_attention(q, k, v), a["wo"])
        if not llama:
            o = o + a["bo"]
        x = x + o
        h = norm(p["mlp_norm"], x)
        m = p["mlp"]
        if llama:
            y = (silu(h @ m["w_gate"]) * (h @ m["w_up"])) @ m["w_down"]
        else:
            y = gelu_tanh(h @ m["w_in"] + m["b_in"]) @ m["w_out"] + m["b_out"]
        x = x + y
    x = norm(params["final_norm"], x)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return x @ head


def forward_packed(params, cfg, tokens_BxL, positions_BxL, segment_ids_BxL):
    """Logits (B x L x V) of packed rows: each nonzero segment is run as its own document.
    Padding positions (segment id 0) are left as NaN."""
    tokens_BxL = np.asarray(tokens_BxL)
    positions_BxL = np.asarray(positions_BxL)
    segment_ids_BxL = np.asarray(segment_ids_BxL)
    b, length = tokens_BxL.shape
    out = np.full((b, length, cfg.vocab_size), np.nan)
    for row in range(b):
        for seg in np.unique(segment_ids_BxL[row]):
            if seg == 0:
                continue
            idx = np.nonzero(segment_ids_BxL[row] == seg)[0]
            out[row, idx] = forward_document(params, cfg, tokens_BxL[row, idx],
                                             positions_BxL[row, idx])
    return out
