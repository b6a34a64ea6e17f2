"""`jaxlm bench generate` (decoder-only, llama) and `jaxlm bench generate --family t5`
(encoder-decoder) run at a tiny size, in-process through the command line (the benchmarked
models' transformers configs and sizes shrunk), and print their figures' rows. Each bench
checks its own greedy tokens against transformers' on the same converted weights, and
prints the count: here every token of every row must agree. No timing is asserted (at this
size N tokens may even time as 1, so a rate's sign is noise): speed is what the benchmarks
measure.
"""

from __future__ import annotations

import re

from test_bench_families import table_rows

from jaxlm import cli

NUMBER = r"-?[\d.,]+"


def spread_of(unit: str, rounds: int = 1) -> str:
    """The pattern of conditions.spread's "median X unit (min Y, max Z, n=N)"."""
    unit = re.escape(unit) if unit.startswith("x") else " " + re.escape(unit)
    return rf"median {NUMBER}{unit} \(min {NUMBER}, max {NUMBER}, n={rounds}\)"


def test_bench_generate_llama_agrees_with_transformers_and_prints_its_figures(capsys,
                                                                              monkeypatch):
    from jaxlm.bench import generate

    for key, value in dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                           num_key_value_heads=1, intermediate_size=40, vocab_size=97,
                           max_position_embeddings=64).items():
        monkeypatch.setitem(generate.MODEL, key, value)
    defaults = dict(prompt_len=7, new_tokens=9, context=30, context_tokens=4, batches=(3,),
                    batched_tokens=5)
    bench = generate.bench_generate
    monkeypatch.setattr(generate, "bench_generate", lambda **kw: bench(**{**defaults, **kw}))
    code = cli.main(["bench", "generate", "--rounds", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table_rows(out)
    assert rows["greedy tokens agreeing"].startswith("9 of 9 ")
    assert rows["batch 3, 5 new tokens"].endswith("3 of 3 rows' greedy tokens agree")
    assert re.fullmatch(spread_of("x") + r" \(target >= 1\.5x\)",
                        rows["jaxlm / transformers decode"])
    for name in ("jaxlm end-to-end", "transformers decode", "weights read once (the floor)",
                 "cached decode step", "cache speedup", "host load"):
        assert name in rows, out


def test_bench_generate_t5_agrees_with_transformers_and_prints_its_figures(capsys, monkeypatch):
    from jaxlm.bench import generate_seq2seq

    monkeypatch.setitem(generate_seq2seq.SIZES, "input_len", 11)
    monkeypatch.setitem(generate_seq2seq.SIZES, "new_tokens", 7)
    monkeypatch.setitem(generate_seq2seq.SIZES, "batches", (3,))
    monkeypatch.setitem(generate_seq2seq.SIZES, "batched_tokens", 5)
    # Not fewer encoder than decoder layers: transformers (5.x) sizes the decoder's cache by
    # num_layers and fails past it.
    for key, value in dict(vocab_size=97, d_model=24, d_kv=10, d_ff=40, num_layers=2,
                           num_decoder_layers=1, num_heads=3).items():
        monkeypatch.setitem(generate_seq2seq.MODEL, key, value)
    code = cli.main(["bench", "generate", "--family", "t5", "--rounds", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table_rows(out)
    assert rows["model"].startswith("t5 d=24 L=2+1 heads=3 ff=40 relu vocab=97")
    # transformers' greedy tokens are the reference: every token, every row.
    assert rows["greedy tokens agreeing"].startswith("7 of 7 ")
    assert re.search(r"; 3 of 3 rows' greedy tokens agree; torch [12] thread\(s\)$",
                     rows["batch 3, input 11, 5 new tokens"])
    for name in ("jaxlm end-to-end", "transformers end-to-end", "jaxlm decode",
                 "transformers decode", "jaxlm / transformers decode", "host load"):
        assert name in rows, out
    assert re.fullmatch(spread_of("x") + r" \(target >= 1\.5x\)",
                        rows["jaxlm / transformers decode"])
