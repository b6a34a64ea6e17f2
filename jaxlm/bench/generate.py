"""`jaxlm bench generate`: decode speed with the KV cache, against Hugging Face transformers
and against recomputing the whole prefix for every token, as printed figures.

The model is LLaMA-style with random weights: 6 layers, d_model 512, 8 heads, SwiGLU 1408,
a 32,000-token vocabulary, untied head (about 52M parameters), float32. A
`transformers.LlamaForCausalLM` is built with random weights, saved as safetensors and
imported with jaxlm's converter (`convert.hf_import`), so both sides run the same weights.
(`jaxlm bench generate --family t5`, the encoder-decoder against T5ForConditionalGeneration:
jaxlm.bench.generate_seq2seq, timed by this module's `against_transformers`.)

Figures (after a warm-up, compilation excluded; `repeats` rounds in which jaxlm and
transformers, and then the cached and the recomputing decoder, run interleaved, the order
swapped every round; each figure is the median over the rounds, printed with its min and max,
and the ratios are taken within a round):
  * end-to-end tokens/s: new tokens / time of one `generate` call (prefill included);
  * decode tokens/s: (N - 1) / (time of N new tokens - time of 1 new token) in a round, the
    per-token rate once the prompt is in the cache, for jaxlm and for `model.generate`
    (greedy, torch threads = this host's cores);
  * at 512 tokens of context: a cached decode step against a full forward pass over the
    512-token prefix per token (one compiled forward over a fixed buffer, causal, so the
    logits at the last real position are the next token's);
  * the memory-bandwidth floor of a batch-1 step: the time to read every weight once (a
    jitted sum of each parameter), against which jaxlm's decode step is compared;
  * batched decoding (batches 8 and 32 of equal-length prompts, 32 new tokens): decode
    tokens/s of both sides, rows x (N - 1) / (time of N - time of 1).
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.bench.conditions import HostConditions, interleaved, median_min_max, spread
from jaxlm.bench.table import print_table
from jaxlm.convert import hf_import
from jaxlm.convert import params as params_lib
from jaxlm.infer.generate import Generator

MODEL = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1408, vocab_size=32_000, max_position_embeddings=1024,
             tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10_000.0,
             bos_token_id=1, eos_token_id=None, pad_token_id=0)


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


def weights_read_s(params, repeats: int) -> list[float]:
    """Seconds to read every parameter once (a jitted sum of each), per round: the
    memory-bandwidth floor of a batch-1 decode step, which reads each weight once per token."""
    read = jax.jit(lambda tree: sum(jnp.sum(x) for x in jax.tree.leaves(tree)))
    read(params).block_until_ready()
    return interleaved({"read": lambda: read(params).block_until_ready()}, repeats)["read"]


def decoder_sides(gen, hf_model, prompts_BxP: np.ndarray):
    """(jaxlm, transformers) greedy generation of a decoder-only model: each a function of n
    returning the n new tokens after a batch of equal-length prompts (B x n)."""
    import torch

    ids = torch.as_tensor(prompts_BxP.astype(np.int64))

    def jaxlm_run(n):
        return np.stack(gen.generate(list(prompts_BxP), n))

    def hf_run(n):
        with torch.inference_mode():
            return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     do_sample=False)[:, prompts_BxP.shape[1]:].numpy()

    return jaxlm_run, hf_run


def against_transformers(sides, rows: int, new_tokens: int, repeats: int
                         ) -> dict[str, np.ndarray]:
    """Both sides' greedy generation for a batch of `rows` (`sides`: (jaxlm_run, hf_run),
    each n -> the B x n new tokens, as decoder_sides or the seq2seq bench's make them): the
    new tokens of each (B x N), and per round (interleaved, after a warm-up) the seconds of N
    and of 1 new tokens ("jaxlm N", "jaxlm 1", "hf N", "hf 1") and decode tokens/s, rows x
    (N - 1) / (time of N - time of 1)."""
    jaxlm_run, hf_run = sides
    out = {"jaxlm tokens": jaxlm_run(new_tokens), "hf tokens": hf_run(new_tokens)}
    jaxlm_run(1), hf_run(1)
    out.update((k, np.array(v)) for k, v in interleaved(
        {"jaxlm N": lambda: jaxlm_run(new_tokens), "jaxlm 1": lambda: jaxlm_run(1),
         "hf N": lambda: hf_run(new_tokens), "hf 1": lambda: hf_run(1)}, repeats).items())
    for side in ("jaxlm", "hf"):
        out[side] = rows * (new_tokens - 1) / (out[f"{side} N"] - out[f"{side} 1"])
    out["ratio"] = out["jaxlm"] / out["hf"]
    out["agree"] = np.array([int(np.all(out["jaxlm tokens"] == out["hf tokens"], axis=1).sum())])
    return out


def bench_generate(prompt_len: int = 32, new_tokens: int = 128, context: int = 512,
                   context_tokens: int = 16, repeats: int = 5, seed: int = 0,
                   batches: tuple[int, ...] = (8, 32), batched_tokens: int = 32
                   ) -> dict[str, float]:
    import torch

    host = HostConditions()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    hf_model, gen = _hf_and_jaxlm_models(seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, MODEL["vocab_size"], size=prompt_len).astype(np.int32)

    # ---- batch 1: jaxlm and transformers interleaved, N then 1 new tokens each ------------
    one = against_transformers(decoder_sides(gen, hf_model, prompt[None]), 1, new_tokens,
                               repeats)
    agree = int(np.cumprod(one["jaxlm tokens"][0] == one["hf tokens"][0]).sum())
    jax_n, hf_n = one["jaxlm N"], one["hf N"]

    def jaxlm_run(n, p):
        return gen.generate([p], n)[0]

    # ---- at `context` tokens: cached step vs a full forward over the prefix ------------
    long_prompt = rng.integers(3, MODEL["vocab_size"], size=context).astype(np.int32)
    jaxlm_run(context_tokens, long_prompt)
    jaxlm_run(1, long_prompt)

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
    # ---- timed: cached decoding and recomputation interleaved ----------------------------
    c = interleaved({"cached N": lambda: jaxlm_run(context_tokens, long_prompt),
                     "cached 1": lambda: jaxlm_run(1, long_prompt),
                     "recompute": lambda: recompute(recompute_n)}, repeats)
    cached_step_s = (np.array(c["cached N"]) - np.array(c["cached 1"])) / (context_tokens - 1)
    recompute_step_s = np.array(c["recompute"]) / recompute_n

    # ---- the memory-bandwidth floor; batched decoding ------------------------------------
    read_s = np.array(weights_read_s(gen.params, repeats))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(gen.params))
    batched = {rows: against_transformers(decoder_sides(gen, hf_model, rng.integers(
        3, MODEL["vocab_size"], size=(rows, prompt_len)).astype(np.int32)), rows,
        batched_tokens, repeats) for rows in batches}

    # Per round; ratios within a round, where both sides met the same load.
    jax_decode, hf_decode = one["jaxlm"], one["hf"]
    per_round = {
        "jaxlm_tokens_per_sec": new_tokens / jax_n, "hf_tokens_per_sec": new_tokens / hf_n,
        "jaxlm_decode_tokens_per_sec": jax_decode, "hf_decode_tokens_per_sec": hf_decode,
        "decode_speedup_vs_hf": jax_decode / hf_decode,
        "end_to_end_speedup_vs_hf": hf_n / jax_n,
        "cached_step_ms": cached_step_s * 1e3, "recompute_step_ms": recompute_step_s * 1e3,
        "cache_speedup": recompute_step_s / cached_step_s,
        "weights_read_ms": read_s * 1e3,
        **{f"batch{rows}_{side}_decode_tokens_per_sec": b[side] for rows, b in batched.items()
           for side in ("jaxlm", "hf")},
        **{f"batch{rows}_decode_speedup_vs_hf": b["ratio"] for rows, b in batched.items()},
    }
    figures = {k: v for name, values in per_round.items()
               for k, v in median_min_max(name, values).items()}
    figures["greedy_tokens_agreeing"] = agree
    figures.update(host.figures())
    med = {name: figures[name] for name in per_round}
    jax_step_ms = 1e3 / med["jaxlm_decode_tokens_per_sec"]
    n_params = sum(p.numel() for p in hf_model.parameters())
    m = MODEL
    print_table([
        ("model", f"llama d={m['hidden_size']} L={m['num_hidden_layers']} "
                  f"heads={m['num_attention_heads']} kv_heads={m['num_key_value_heads']} "
                  f"ff={m['intermediate_size']} vocab={m['vocab_size']}, {n_params:,} "
                  f"parameters, float32, batch 1, random weights"),
        ("host", f"{cores} CPU cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
                 f"torch {torch.__version__} ({torch.get_num_threads()} threads)"),
        (f"prompt {prompt_len}, {new_tokens} new tokens",
         f"{repeats} rounds, jaxlm and transformers interleaved"),
        ("  jaxlm end-to-end", spread(per_round["jaxlm_tokens_per_sec"], ",.1f", "tokens/s")),
        ("  transformers end-to-end", spread(per_round["hf_tokens_per_sec"], ",.1f",
                                             "tokens/s")),
        ("  jaxlm decode", spread(jax_decode, ",.1f", "tokens/s")
         + f"; {1e3 / med['jaxlm_decode_tokens_per_sec']:.2f} ms/token"),
        ("  transformers decode", spread(hf_decode, ",.1f", "tokens/s")
         + f"; {1e3 / med['hf_decode_tokens_per_sec']:.2f} ms/token"),
        ("  jaxlm / transformers decode", spread(per_round["decode_speedup_vs_hf"], ".2f", "x")
         + " (target >= 1.5x)"),
        ("  jaxlm / transformers end-to-end", spread(per_round["end_to_end_speedup_vs_hf"],
                                                     ".2f", "x") + " (target >= 1.5x)"),
        ("  greedy tokens agreeing", f"{agree} of {new_tokens} (first divergence ends the count)"),
        ("  weights read once (the floor)", f"{weight_bytes / 1e6:,.0f} MB in "
         + spread(per_round["weights_read_ms"], ".2f", "ms")
         + f", {weight_bytes / med['weights_read_ms'] / 1e6:,.1f} GB/s"),
        ("  jaxlm decode step / floor", f"{jax_step_ms / med['weights_read_ms']:.2f}x"),
        *[row for rows, b in batched.items() for row in (
            (f"batch {rows}, {batched_tokens} new tokens", f"{repeats} rounds, interleaved; "
             f"{int(b['agree'][0])} of {rows} rows' greedy tokens agree"),
            ("  jaxlm decode", spread(b["jaxlm"], ",.1f", "tokens/s")),
            ("  transformers decode", spread(b["hf"], ",.1f", "tokens/s")),
            ("  jaxlm / transformers", spread(b["ratio"], ".2f", "x")))],
        (f"context {context}", f"{repeats} rounds, cached and recomputing interleaved"),
        ("  cached decode step", spread(per_round["cached_step_ms"], ".2f", "ms/token")),
        ("  recompute prefix per token", spread(per_round["recompute_step_ms"], ".1f",
                                                "ms/token")),
        ("  cache speedup", spread(per_round["cache_speedup"], ".1f", "x") + " (target >= 5x)"),
        *host.rows(),
    ])
    return figures
