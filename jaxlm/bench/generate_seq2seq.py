"""`jaxlm bench generate --family t5`: sequence-to-sequence greedy decoding against Hugging
Face transformers' T5ForConditionalGeneration.generate, as printed figures.

The model is T5-small's shape with random weights (T5 v1.0: 6 encoder + 6 decoder layers,
d_model 512, 8 heads of 64, ReLU MLP 2048, the 32,128-id vocabulary, head tied to the
embedding with the d_model**-0.5 rescaling: 60.5M parameters), float32, no stop token (both
sides always generate N tokens). A `transformers.T5ForConditionalGeneration` is built with
random weights, saved as safetensors and imported with jaxlm's converter
(`convert.hf_import`), so both sides run the same weights; jaxlm generates with
jaxlm.infer.seq2seq.Seq2SeqGenerator (one jitted call: the encoder once, then the decoder
token by token in a `lax.while_loop` over its cache), transformers with
`model.generate(do_sample=False)` from decoder start id 0, with torch's faster thread
count for each batch: 1 or the host's cores, timed interleaved before the rounds (on a
busy 2-core host two threads spin against the other load and run up to 10x slower; on a
quiet one they win at batch 8 and above).

Figures, timed as `jaxlm bench generate` times the decoder-only model
(jaxlm.bench.generate.against_transformers: after a warm-up, `repeats` rounds in which
jaxlm and transformers run interleaved, the order swapped every round; medians with min and
max, ratios within a round):
  * batch 1, an input of `input_len` tokens, N new tokens: end-to-end tokens/s (N / the
    time of one `generate` call, the encoder included) and decode tokens/s ((N - 1) / (time
    of N new tokens - time of 1), the per-token rate once the encoder ran), and how many of
    the N greedy tokens agree (up to the first divergence);
  * batched (each of `batches` rows, equal-length inputs, `batched_tokens` new tokens):
    decode tokens/s of both sides, rows x (N - 1) / (time of N - time of 1), and how many
    rows' greedy tokens agree.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from jaxlm.bench.conditions import HostConditions, interleaved, median_min_max, spread
from jaxlm.bench.generate import against_transformers
from jaxlm.bench.table import print_table
from jaxlm.convert import hf_import
from jaxlm.convert import params as params_lib
from jaxlm.infer.seq2seq import Seq2SeqGenerator

# transformers.T5Config of the benchmarked model (T5-small's shape); read when the benchmark
# runs, so a test can shrink it.
MODEL = dict(vocab_size=32_128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
             num_decoder_layers=6, num_heads=8, relative_attention_num_buckets=32,
             relative_attention_max_distance=128, feed_forward_proj="relu",
             tie_word_embeddings=True, dropout_rate=0.0, layer_norm_epsilon=1e-6,
             pad_token_id=0, decoder_start_token_id=0, eos_token_id=None)
# The benchmark's lengths and batches (bench_generate_seq2seq's defaults), likewise.
SIZES = dict(input_len=64, new_tokens=64, batches=(8, 32), batched_tokens=32)
DECODER_START = 0  # T5's: the pad id


def _hf_and_jaxlm_models(seed: int):
    """(the transformers model, jaxlm Seq2SeqGenerator) with the same random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_model = transformers.T5ForConditionalGeneration(transformers.T5Config(**MODEL))
    hf_model = hf_model.float().eval()
    # transformers' random T5 initialisation makes greedy decoding repeat id 0 from the first
    # token, so agreement would prove nothing: the embedding and position-bias tables scaled
    # by 0.3 and every projection by 3 make the outputs vary (17-19 ids of 32 per row).
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "layer_norm" not in name:
                p.mul_(0.3 if "shared" in name or "relative_attention" in name else 3.0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        ckpt = hf_import.open_checkpoint(tmp)
        flat = hf_import.read_params(ckpt)
    model_cfg = ckpt.model_cfg
    model_cfg.remat = "none"
    return hf_model, Seq2SeqGenerator(model_cfg, params_lib.unflatten(flat))


def seq2seq_sides(gen: Seq2SeqGenerator, hf_model, inputs_BxS: np.ndarray):
    """(jaxlm, transformers) greedy generation from a batch of equal-length inputs: each a
    function of n returning the n tokens after the decoder start (B x n)."""
    import torch

    ids = torch.as_tensor(inputs_BxS.astype(np.int64))

    def jaxlm_run(n):
        return np.stack(gen.generate(list(inputs_BxS), n, decoder_start_id=DECODER_START))

    def hf_run(n):
        with torch.inference_mode():
            return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     do_sample=False, decoder_start_token_id=DECODER_START,
                                     )[:, 1:].numpy()

    return jaxlm_run, hf_run


def fastest_torch_threads(hf_run, n: int, cores: int, rounds: int = 3) -> int:
    """Sets and returns torch's thread count, 1 or `cores`, under which hf_run(n) was faster
    (median of `rounds` interleaved rounds after a warm-up of each)."""
    import torch

    def at(threads: int):
        def run():
            torch.set_num_threads(threads)
            hf_run(n)
        return run

    counts = sorted({1, cores})
    for threads in counts:
        at(threads)()
    times = interleaved({threads: at(threads) for threads in counts}, rounds)
    best = min(counts, key=lambda threads: float(np.median(times[threads])))
    torch.set_num_threads(best)
    return best


def bench_generate_seq2seq(input_len: int | None = None, new_tokens: int | None = None,
                           batches: tuple[int, ...] | None = None,
                           batched_tokens: int | None = None, repeats: int = 5,
                           seed: int = 0) -> dict[str, float]:
    import torch

    sizes = {**SIZES, **{k: v for k, v in dict(
        input_len=input_len, new_tokens=new_tokens, batches=batches,
        batched_tokens=batched_tokens).items() if v is not None}}
    input_len, new_tokens = sizes["input_len"], sizes["new_tokens"]
    batches, batched_tokens = tuple(sizes["batches"]), sizes["batched_tokens"]
    host = HostConditions()
    cores = os.cpu_count() or 1
    hf_model, gen = _hf_and_jaxlm_models(seed)
    rng = np.random.default_rng(seed)
    vocab = MODEL["vocab_size"]

    def inputs(rows: int) -> np.ndarray:
        return rng.integers(2, vocab, size=(rows, input_len)).astype(np.int32)

    # ---- batch 1, then each batch: jaxlm and transformers interleaved, N then 1 tokens ----
    # (torch's thread count for each batch: fastest_torch_threads, set before its rounds)
    threads: dict[int, int] = {}

    def compare(rows: int, n: int) -> dict[str, np.ndarray]:
        sides = seq2seq_sides(gen, hf_model, inputs(rows))
        threads[rows] = fastest_torch_threads(sides[1], n, cores)
        return against_transformers(sides, rows, n, repeats)

    one = compare(1, new_tokens)
    agree = int(np.cumprod(one["jaxlm tokens"][0] == one["hf tokens"][0]).sum())
    batched = {rows: compare(rows, batched_tokens) for rows in batches}

    # Per round; ratios within a round, where both sides met the same load.
    per_round = {
        "jaxlm_tokens_per_sec": new_tokens / one["jaxlm N"],
        "hf_tokens_per_sec": new_tokens / one["hf N"],
        "jaxlm_decode_tokens_per_sec": one["jaxlm"], "hf_decode_tokens_per_sec": one["hf"],
        "decode_speedup_vs_hf": one["ratio"],
        "end_to_end_speedup_vs_hf": one["hf N"] / one["jaxlm N"],
        **{f"batch{rows}_{side}_decode_tokens_per_sec": b[side] for rows, b in batched.items()
           for side in ("jaxlm", "hf")},
        **{f"batch{rows}_decode_speedup_vs_hf": b["ratio"] for rows, b in batched.items()},
    }
    figures = {k: v for name, values in per_round.items()
               for k, v in median_min_max(name, values).items()}
    figures["greedy_tokens_agreeing"] = agree
    figures.update({f"batch{rows}_torch_threads": float(k) for rows, k in threads.items()})
    figures.update({f"batch{rows}_rows_agreeing": int(b["agree"][0])
                    for rows, b in batched.items()})
    figures.update(host.figures())
    med = {name: figures[name] for name in per_round}
    n_params = sum(p.numel() for p in hf_model.parameters())
    m = MODEL
    print_table([
        ("model", f"t5 d={m['d_model']} L={m['num_layers']}+{m['num_decoder_layers']} "
                  f"heads={m['num_heads']} ff={m['d_ff']} {m['feed_forward_proj']} "
                  f"vocab={vocab}, {n_params:,} parameters, float32, random weights"),
        ("host", f"{cores} CPU cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
                 f"torch {torch.__version__} (threads per batch: the faster of 1 and {cores})"),
        (f"batch 1, input {input_len}, {new_tokens} new tokens",
         f"{repeats} rounds, jaxlm and transformers interleaved; torch {threads[1]} "
         f"thread(s)"),
        ("  jaxlm end-to-end", spread(per_round["jaxlm_tokens_per_sec"], ",.1f", "tokens/s")),
        ("  transformers end-to-end", spread(per_round["hf_tokens_per_sec"], ",.1f",
                                             "tokens/s")),
        ("  jaxlm decode", spread(one["jaxlm"], ",.1f", "tokens/s")
         + f"; {1e3 / med['jaxlm_decode_tokens_per_sec']:.2f} ms/token"),
        ("  transformers decode", spread(one["hf"], ",.1f", "tokens/s")
         + f"; {1e3 / med['hf_decode_tokens_per_sec']:.2f} ms/token"),
        ("  jaxlm / transformers decode", spread(one["ratio"], ".2f", "x") + " (target >= 1.5x)"),
        ("  jaxlm / transformers end-to-end", spread(per_round["end_to_end_speedup_vs_hf"],
                                                     ".2f", "x")),
        ("  greedy tokens agreeing", f"{agree} of {new_tokens} (first divergence ends the count)"),
        *[row for rows, b in batched.items() for row in (
            (f"batch {rows}, input {input_len}, {batched_tokens} new tokens",
             f"{repeats} rounds, interleaved; {int(b['agree'][0])} of {rows} rows' greedy "
             f"tokens agree; torch {threads[rows]} thread(s)"),
            ("  jaxlm decode", spread(b["jaxlm"], ",.1f", "tokens/s")),
            ("  transformers decode", spread(b["hf"], ",.1f", "tokens/s")),
            ("  jaxlm / transformers", spread(b["ratio"], ".2f", "x") + " (target >= 1.5x)"))],
        *host.rows(),
    ])
    return figures
