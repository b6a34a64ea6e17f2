"""`jaxlm bench quant --workdir RUN`: what weight-only quantization and the int8 KV cache
cost and buy on a trained decoder run, as printed figures.

    jaxlm train --workdir runs/tiny && jaxlm bench quant --workdir runs/tiny [--rounds 3]

RUN is quantized to int8 (a scale per output channel), int4 and nf4 (groups of 32) in a
temporary directory with `jaxlm quantize`'s code. For float32 and each format:
  * parameter bytes (the saved arrays; int4 packs two codes a byte) and their ratio to
    float32, and the checkpoint's bytes on disk;
  * the validation loss and perplexity (`jaxlm eval`'s figures) and the perplexity's change;
  * greedy agreement with the float run: the share of 64 new tokens equal, position by
    position, over 4 prompts (one early near-tie flips every token after it), and the
    teacher-forced agreement: the share of a validation batch's target positions where the
    variant's most likely next token is the float run's;
  * decode tokens/s at batch 1 and batch 8 (prompts of 32 tokens, 128 new tokens):
    rows x (N - 1) / (time of N new tokens - time of 1), the median over `rounds` rounds in
    which every variant runs once, interleaved (compilation excluded).
The int8 KV cache is measured the same way on the float weights and on int8 weights (its
bytes per cached token beside the float cache's). On XLA:CPU the dequantization runs as
separate element-wise work before each matmul: the figures say whether that costs or pays
on this host; on TPU and GPU XLA fuses it into the matmul's operand read.
"""

from __future__ import annotations

import pathlib
import tempfile

import jax
import numpy as np
from flax import nnx

from jaxlm.bench.conditions import HostConditions, interleaved, spread
from jaxlm.bench.table import print_table
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint import rundir
from jaxlm.checkpoint.inspect import disk_bytes, format_bytes
from jaxlm.errors import UserError
from jaxlm.infer import evaluate as evaluate_lib
from jaxlm.infer import generate
from jaxlm.infer import quantize as quantize_lib
from jaxlm.model import counts
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train.task import Task

FORMATS = {"int8": 0, "int4": 32, "nf4": 32}
AGREE_PROMPTS = ["import os\n", "def main(", "class Foo", "    return "]
AGREE_TOKENS = 64


def param_bytes(workdir: pathlib.Path) -> int:
    """Bytes of a run's saved parameters (4-bit codes: half a byte each)."""
    arrays = checkpoint_lib.saved_arrays(rundir.latest_step_dir(workdir))
    return sum(int(np.prod(m.shape)) * jax.dtypes.itemsize_bits(m.dtype) // 8
               for name, m in arrays.items() if name.startswith("params/"))


def bench_quant(workdir: str, task_for_run, rounds: int = 3, new_tokens: int = 128,
                prompt_len: int = 32, batch: int = 8) -> dict[str, dict]:
    """`task_for_run(workdir) -> Task` (jaxlm.cli.tasks.for_run: the run's own task, for
    `jaxlm eval`'s figures). Returns the figures by variant."""
    host = HostConditions()
    source = rundir.locate(workdir).workdir
    cfg, _ = rundir.saved_config(source)
    quantize_lib.quantized_config(cfg, "int8", None)  # a run that cannot be quantized: now
    if cfg.model.max_seq_len < 2 * prompt_len:
        raise UserError(f"{source}: model.max_seq_len {cfg.model.max_seq_len} is too short "
                        f"for the benchmark's prompts of {prompt_len} tokens and their decode")
    tok = rundir.load_tokenizer(source)
    new_tokens = min(new_tokens, cfg.model.max_seq_len - prompt_len)  # what the model holds
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"float32": source}
        for fmt, group in FORMATS.items():
            runs[fmt] = pathlib.Path(tmp) / fmt
            quantize_lib.quantize_run(source, runs[fmt], fmt, group, log=lambda _: None)
        figures = {name: files_and_quality(run, task_for_run(run)) for name, run in runs.items()}
        gens = {name: generate.load(run)[0] for name, run in runs.items()}
        validation = next(iter(task_for_run(source).batches("validation", process_index=0,
                                                       process_count=1)))
    for name in ("float32", "int8"):
        base = gens[name]
        gens[f"{name} + int8 cache"] = generate.Generator(base.cfg, base.params, base.mesh,
                                                          kv_cache_dtype="int8")
    prompts = [generate.encode_prompt(tok, p) for p in AGREE_PROMPTS]
    want = gens["float32"].generate(prompts, AGREE_TOKENS)
    next_float = _next_tokens(gens["float32"], validation)
    mask = validation["weights"] > 0
    for name, gen in gens.items():
        got = gen.generate(prompts, AGREE_TOKENS)
        figures.setdefault(name, {})["agree"] = float(np.mean(
            [np.mean(a == b) for a, b in zip(got, want)]))
        if "cache" not in name:  # the cache plays no part in a forward pass
            figures[name]["forced"] = float(np.mean(
                (_next_tokens(gen, validation) == next_float)[mask]))
    figures.update({name: {**figures[name], **rates} for name, rates in
                    decode_rates(gens, cfg.model.vocab_size, rounds, new_tokens, prompt_len,
                                  batch).items()})
    _print(figures, cfg.model, host, rounds, prompt_len, new_tokens, batch)
    return figures


def _next_tokens(gen: generate.Generator, batch: dict) -> np.ndarray:
    """The most likely next token at every position of a packed batch (B x L)."""
    fn = jax.jit(lambda p, t, pos, seg: nnx.merge(gen.graphdef, p)(t, pos, seg).argmax(-1))
    with mesh_lib.use(gen.mesh):
        return np.asarray(fn(gen.params, *(jax.numpy.asarray(batch[k]) for k in
                                           ("inputs", "positions", "segment_ids"))))


def files_and_quality(run: pathlib.Path, task: Task) -> dict:
    ev = evaluate_lib.evaluate(task, run)
    return {"param_bytes": param_bytes(run), "disk": disk_bytes(rundir.latest_step_dir(run)),
            "loss": ev["loss"], "perplexity": float(np.exp(ev["loss"]))}


def decode_rates(gens: dict, vocab: int, rounds: int, new_tokens: int, prompt_len: int,
                  batch: int) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    prompts = {rows: list(rng.integers(1, vocab, size=(rows, prompt_len)).astype(np.int32))
               for rows in (1, batch)}
    sides = {}
    for name, gen in gens.items():
        for rows, p in prompts.items():
            for n in (new_tokens, 1):
                sides[(name, rows, n)] = lambda gen=gen, p=p, n=n: gen.generate(p, n)
    for side in sides.values():  # compile every shape once
        side()
    times = interleaved(sides, rounds)
    out: dict[str, dict] = {}
    for name in gens:
        for rows in prompts:
            rates = [rows * (new_tokens - 1) / (a - b) for a, b in
                     zip(times[(name, rows, new_tokens)], times[(name, rows, 1)])]
            out.setdefault(name, {})[f"decode b{rows}"] = rates
    return out


def _print(figures: dict, model_cfg, host: HostConditions, rounds: int, prompt_len: int,
           new_tokens: int, batch: int) -> None:
    floats = figures["float32"]
    head_dim = counts.head_dim(model_cfg)
    cache_float = 2 * model_cfg.n_layers * model_cfg.n_kv_heads * head_dim * \
        np.dtype(model_cfg.dtype).itemsize
    cache_int8 = 2 * model_cfg.n_layers * model_cfg.n_kv_heads * (head_dim + 4)
    rows = [("model", f"{model_cfg.family}, {model_cfg.n_layers} layers, d_model "
                      f"{model_cfg.d_model}, {model_cfg.dtype}; decode: prompts of {prompt_len} "
                      f"tokens, "
                      f"{new_tokens} new, median of {rounds} interleaved rounds (min-max)")]
    for name, f in figures.items():
        decode = "; ".join(f"batch {r} {spread(f[f'decode b{r}'], '.0f', 'tok/s')}"
                           for r in (1, batch))
        if "param_bytes" in f:
            rows.append((name, f"params {format_bytes(f['param_bytes'])} "
                               f"({f['param_bytes'] / floats['param_bytes']:.3f}x of float32), "
                               f"checkpoint {format_bytes(f['disk'])} on disk; validation "
                               f"loss {f['loss']:.4f}, perplexity {f['perplexity']:.3f} "
                               f"({(f['perplexity'] / floats['perplexity'] - 1) * 100:+.2f}%)"))
        forced = (f"; teacher-forced next-token agreement {f['forced'] * 100:.1f}%"
                  if "forced" in f else "")
        rows.append((f"{name} decode", f"{decode}; greedy agreement with float32 "
                                       f"{f['agree'] * 100:.1f}% of {AGREE_TOKENS} tokens"
                                       + forced))
    rows.append(("KV cache per token", f"{model_cfg.dtype} {cache_float:,} bytes, int8 "
                                       f"{cache_int8:,} bytes (codes + a float32 scale per "
                                       f"slot and kv head)"))
    print_table(rows + host.rows())
