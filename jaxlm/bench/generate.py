"""`jaxlm bench generate`: decode speed with the KV cache, against Hugging Face transformers
and against recomputing the whole prefix for every token, as printed figures.

The model is LLaMA-style with random weights: 6 layers, d_model 512, 8 heads, SwiGLU 1408,
a 32,000-token vocabulary, untied head (about 52M parameters), float32, batch 1. A
`transformers.LlamaForCausalLM` is built with random weights, saved as safetensors and
imported with jaxlm's converter (`convert.hf_import`), so both sides run the same weights.

Figures (each the best of `repeats` timed runs after a warm-up; compilation excluded):
  * end-to-end tokens/s: new tokens / time of one `generate` call (prefill included);
  * decode tokens/s: (N - 1) / (time of N new tokens - time of 1 new token), the per-token
    rate once the prompt is in the cache, for jaxlm and for `model.generate` (greedy, torch
    threads = this host's cores);
  * at 512 tokens of context: a cached decode step against a full forward pass over the
    512-token prefix per token (one compiled forward over a fixed buffer, causal, so the
    logits at the last real position are the next token's).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.bench.table import print_table
from jaxlm.convert import hf_import
from jaxlm.convert import params as params_lib
from jaxlm.infer.generate import Generator

MODEL = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1408, vocab_size=32_000, max_position_embeddings=1024,
             tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10_000.0,
             bos_token_id=1, eos_token_id=None, pad_token_id=0)


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _hf_and_jaxlm_models(seed: int):
    """(the transformers model, jaxlm Generator) with the same random weights."""
    import torch
    import transformers


    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**MODEL)
    hf_model = transformers.LlamaForCausalLM(config).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        ckpt = hf_import.open_checkpoint(tmp)
        flat = hf_import.read_params(ckpt)
    model_cfg = ckpt.model_cfg
    model_cfg.remat = "none"
    return hf_model, Generator(model_cfg, params_lib.unflatten(flat))


def bench_generate(prompt_len: int = 32, new_tokens: int = 128, context: int = 512,
                   context_tokens: int = 16, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    hf_model, gen = _hf_and_jaxlm_models(seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, MODEL["vocab_size"], size=prompt_len).astype(np.int32)

    # ---- jaxlm, cached decoding ---------------------------------------------------------
    def jaxlm_run(n, p=prompt):
        return gen.generate([p], n)[0]

    jax_tokens = jaxlm_run(new_tokens)  # compiles prefill and step
    jaxlm_run(1)
    jax_n = _best(lambda: jaxlm_run(new_tokens), repeats)
    jax_1 = _best(lambda: jaxlm_run(1), repeats)

    # ---- transformers, model.generate greedy ------------------------------------------------
    ids = torch.as_tensor(prompt[None].astype(np.int64))

    def hf_run(n):
        with torch.inference_mode():
            return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     do_sample=False)[0, prompt_len:].numpy()

    hf_tokens = hf_run(new_tokens)
    hf_n = _best(lambda: hf_run(new_tokens), repeats)
    hf_1 = _best(lambda: hf_run(1), repeats)
    agree = int(np.cumprod(hf_tokens == jax_tokens).sum())

    # ---- at `context` tokens: cached step vs a full forward over the prefix ------------
    long_prompt = rng.integers(3, MODEL["vocab_size"], size=context).astype(np.int32)
    jaxlm_run(context_tokens, long_prompt)
    jaxlm_run(1, long_prompt)
    cached_n = _best(lambda: jaxlm_run(context_tokens, long_prompt), repeats)
    cached_1 = _best(lambda: jaxlm_run(1, long_prompt), repeats)
    cached_step_s = (cached_n - cached_1) / (context_tokens - 1)

    graphdef = gen.graphdef
    length = context + context_tokens

    @jax.jit
    def full_forward_next(params, buf_1xT, last):  # the next token after position `last`
        logits_1xTxV = nnx.merge(graphdef, params)(buf_1xT)
        return jnp.argmax(logits_1xTxV[0, last])

    def recompute(n):
        buf = np.zeros((1, length), np.int32)
        buf[0, :context] = long_prompt
        for i in range(n):
            token = int(full_forward_next(gen.params, jnp.asarray(buf), context - 1 + i))
            buf[0, context + i] = token
        return buf

    recompute(1)
    recompute_n = 4
    recompute_step_s = _best(lambda: recompute(recompute_n), repeats) / recompute_n

    jax_decode = (new_tokens - 1) / (jax_n - jax_1)
    hf_decode = (new_tokens - 1) / (hf_n - hf_1)
    figures = {
        "jaxlm_tokens_per_sec": new_tokens / jax_n, "hf_tokens_per_sec": new_tokens / hf_n,
        "jaxlm_decode_tokens_per_sec": jax_decode, "hf_decode_tokens_per_sec": hf_decode,
        "decode_speedup_vs_hf": jax_decode / hf_decode,
        "end_to_end_speedup_vs_hf": hf_n / jax_n,
        "cached_step_ms": cached_step_s * 1e3, "recompute_step_ms": recompute_step_s * 1e3,
        "cache_speedup": recompute_step_s / cached_step_s, "greedy_tokens_agreeing": agree,
    }
    n_params = sum(p.numel() for p in hf_model.parameters())
    print_table([
        ("model", f"llama d=512 L=6 heads=8 ff=1408 vocab=32000, {n_params / 1e6:.1f}M params, "
                  f"float32, batch 1, random weights"),
        ("host", f"{cores} CPU cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
                 f"torch {torch.__version__} ({torch.get_num_threads()} threads)"),
        (f"prompt {prompt_len}, {new_tokens} new tokens", f"best of {repeats}"),
        ("  jaxlm end-to-end", f"{new_tokens / jax_n:,.1f} tokens/s ({jax_n:.3f} s)"),
        ("  transformers end-to-end", f"{new_tokens / hf_n:,.1f} tokens/s ({hf_n:.3f} s)"),
        ("  jaxlm decode", f"{jax_decode:,.1f} tokens/s ({1e3 / jax_decode:.2f} ms/token)"),
        ("  transformers decode", f"{hf_decode:,.1f} tokens/s ({1e3 / hf_decode:.2f} ms/token)"),
        ("  jaxlm / transformers", f"decode {jax_decode / hf_decode:.2f}x, end-to-end "
                                   f"{hf_n / jax_n:.2f}x (target >= 1.5x)"),
        ("  greedy tokens agreeing", f"{agree} of {new_tokens} (first divergence ends the count)"),
        (f"context {context}", ""),
        ("  cached decode step", f"{cached_step_s * 1e3:.2f} ms/token"),
        ("  recompute prefix per token", f"{recompute_step_s * 1e3:.1f} ms/token"),
        ("  cache speedup", f"{recompute_step_s / cached_step_s:.1f}x (target >= 5x)"),
    ])
    return figures
