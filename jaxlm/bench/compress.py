"""`jaxlm bench compress --workdir TEACHER --runs NAME=RUN,...`: what pruning and
distillation cost and buy, as printed figures, for a teacher run and runs made from it.

    jaxlm bench compress --workdir runs/tiny \\
        --runs pruned=runs/tiny-half,plain=runs/tiny-half-plain,distilled=runs/tiny-half-distill

For the teacher and each run (all read only):
  * parameters (and their ratio to the teacher's), the newest checkpoint's bytes on disk;
  * the validation loss and perplexity (`jaxlm eval`'s figures, the whole split);
  * train-step tokens/s: the run's own training step (its config, a synthetic batch; a
    distilled run's step with its teacher's forward pass, as it trained);
  * decode tokens/s at batch 1 and batch 8 (prompts of 32 tokens, 128 new), and its ratio
    to the teacher's.
Timings are medians over `rounds` rounds in which every run takes its turn, interleaved.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from jaxlm.bench.conditions import HostConditions, interleaved, spread
from jaxlm.bench.quant import decode_rates, files_and_quality
from jaxlm.bench.step import BenchRun
from jaxlm.bench.table import print_table
from jaxlm.checkpoint import rundir
from jaxlm.checkpoint.inspect import format_bytes
from jaxlm.errors import ConfigError
from jaxlm.infer import generate
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import pretraining

TEACHER = "teacher"


def parse_runs(text: str) -> dict[str, pathlib.Path]:
    """`NAME=RUN,NAME=RUN` -> {name: run directory}; ConfigError naming what is wrong."""
    runs: dict[str, pathlib.Path] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--runs: {item!r} is not NAME=RUN")
        if name in runs or name == TEACHER:
            raise ConfigError(f"--runs: the name {name!r} is taken")
        runs[name] = pathlib.Path(path)
    if not runs:
        raise ConfigError("--runs: give at least one NAME=RUN to compare with the teacher")
    return runs


def step_run(run: pathlib.Path) -> BenchRun:
    """The run's own training step (as its config trains: a distillation step with its
    teacher), fresh parameters, on a synthetic batch."""
    cfg, _ = rundir.saved_config(run)
    cfg = mesh_lib.fit_mesh(cfg)
    cfg.checkpoint.init_from = ""  # the step's cost does not depend on where it started
    return BenchRun(pretraining.task(cfg, tokenizer=rundir.load_tokenizer(run)))


def bench_compress(teacher: str, runs: dict[str, pathlib.Path], task_for_run, rounds: int = 3,
                   steps: int = 2, new_tokens: int = 128, prompt_len: int = 32,
                   batch: int = 8) -> dict[str, dict]:
    """`task_for_run(run) -> Task` (jaxlm.cli.tasks.for_run, for `jaxlm eval`'s figures).
    Returns the figures by name (the teacher's as "teacher")."""
    host = HostConditions()
    runs = {TEACHER: rundir.locate(teacher).workdir,
            **{n: rundir.locate(r).workdir for n, r in runs.items()}}
    cfgs = {n: rundir.saved_config(r)[0] for n, r in runs.items()}
    vocab = {c.model.vocab_size for c in cfgs.values()}
    if len(vocab) != 1 or any(zoo.family(c.model.family).kind != "decoder"
                              for c in cfgs.values()):
        raise ConfigError("--runs: the teacher and every run must be decoder runs of one "
                          "vocabulary")
    max_len = min(c.model.max_seq_len for c in cfgs.values())
    if max_len < 2 * prompt_len:
        raise ConfigError(f"model.max_seq_len {max_len} is too short for the benchmark's "
                          f"prompts of {prompt_len} tokens and their decode")
    new_tokens = min(new_tokens, max_len - prompt_len)
    figures = {n: {**files_and_quality(r, task_for_run(r)),
                   "params": zoo.param_count(cfgs[n].model),
                   "distilled": bool(cfgs[n].distill.teacher)} for n, r in runs.items()}
    steppers = {n: step_run(r) for n, r in runs.items()}

    def side(s: BenchRun):
        def go():
            with mesh_lib.use(s.mesh):
                for _ in range(steps):
                    s.step()
                jax.block_until_ready(s.out)
        return go

    times = interleaved({n: side(s) for n, s in steppers.items()}, rounds)
    for n, s in steppers.items():
        figures[n]["train tok/s"] = [steps * s.tokens_per_step / t for t in times[n]]
    del steppers
    gens = {n: generate.load(r)[0] for n, r in runs.items()}
    for n, rates in decode_rates(gens, vocab.pop(), rounds, new_tokens, prompt_len,
                                 batch).items():
        figures[n].update(rates)
    _print(figures, host, rounds, prompt_len, new_tokens, batch)
    return figures


def _print(figures: dict, host: HostConditions, rounds: int, prompt_len: int,
           new_tokens: int, batch: int) -> None:
    t = figures[TEACHER]
    rows = [("measured", f"train step on a synthetic batch; decode: prompts of {prompt_len} "
                         f"tokens, {new_tokens} new; medians of {rounds} interleaved rounds "
                         f"(min-max)")]
    for name, f in figures.items():
        decode = "; ".join(
            f"batch {r} {spread(f[f'decode b{r}'], '.0f', 'tok/s')} "
            f"({np.median(f[f'decode b{r}']) / np.median(t[f'decode b{r}']):.2f}x)"
            for r in (1, batch))
        step = "distillation step" if f["distilled"] else "train step"
        rows.append((name, f"{f['params']:,} parameters ({f['params'] / t['params']:.3f}x), "
                           f"checkpoint {format_bytes(f['disk'])}; validation loss "
                           f"{f['loss']:.4f} (teacher {f['loss'] - t['loss']:+.4f}), "
                           f"perplexity {f['perplexity']:.3f}"))
        rows.append((f"{name} speed", f"{step} {spread(f['train tok/s'], '.0f', 'tok/s')}; "
                                      f"decode {decode}"))
    print_table(rows + host.rows())
