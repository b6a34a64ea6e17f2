"""`jaxlm generate` and `jaxlm eval`: a run's newest checkpoint with the config saved in it
(`--config.key=value` overrides apply on top) and the tokenizer in WORKDIR/tokenizer.
`eval` evaluates with the run's own task (jaxlm.infer.evaluate), on several processes too.

    jaxlm generate --workdir runs/tiny --prompt "import os" [--max-new-tokens 128]
        [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--stop-id ID] [--ignore-eos]
    jaxlm eval --workdir runs/tiny [--split validation] [--max-batches N] [--json]

One prompt streams its text as it is generated; several (repeat --prompt) are generated
as one batch and printed when done. Exit status 2: bad input (the message names it).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.checkpoint import rundir
from jaxlm.cli import tasks
from jaxlm.cli.train import add_multihost_arguments, on_every_process

VERBS = ("generate", "eval")


def add_parsers(verbs) -> None:
    gen = verbs.add_parser("generate", help="generate text from a run's latest checkpoint")
    gen.add_argument("--workdir", required=True, help="run directory (checkpoints/, tokenizer/)")
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text; repeat for a batch (a single prompt streams)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop-id", type=int, action="append", default=[],
                     help="a token id that ends a row (repeatable); the tokenizer's EOS (and a converted "
                          "model's eos ids) also do")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    ev = verbs.add_parser("eval", help="a run's latest checkpoint evaluated by its task on a "
                          "split (language models: loss and perplexity)")
    ev.add_argument("--workdir", required=True)
    ev.add_argument("--split", default="validation", choices=["train", "validation"])
    ev.add_argument("--max-batches", type=int, default=None, help="default: the whole split")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_multihost_arguments(ev)


def run_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxlm.infer import generate

    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p)
    cfg, step_dir = rundir.saved_config(args.workdir)
    config_lib.apply_overrides(cfg, overrides)
    for stop_id in args.stop_id:
        if not 0 <= stop_id < cfg.model.vocab_size:
            raise errors.UserError(f"--stop-id {stop_id}: not an id of this model's vocabulary "
                                   f"[0, {cfg.model.vocab_size})")
    tokenizer = rundir.load_tokenizer(args.workdir)
    prompts = [generate.encode_prompt(tokenizer, p) for p in args.prompt]
    # Before the parameters are read: a prompt that does not fit is reported now.
    generate.check_prompts(prompts, args.max_new_tokens, cfg.model.vocab_size,
                           cfg.model.max_seq_len)
    stop = set(args.stop_id)
    if not args.ignore_eos:
        stop.update(generate.default_stop_ids(tokenizer, step_dir))
    gen, tokenizer, _ = generate.load(args.workdir, cfg)
    if len(prompts) == 1:
        tokens = (int(t[0]) for t, live in gen.stream(prompts, args.max_new_tokens, sampling,
                                                       sorted(stop), args.seed)
                  if live[0] and int(t[0]) not in stop)
        sys.stdout.write(args.prompt[0])
        for piece in generate.stream_text(tokenizer, tokens, prefix_ids=prompts[0]):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return errors.DONE
    outs = gen.generate(prompts, args.max_new_tokens, sampling, sorted(stop), args.seed)
    for i, (text, out) in enumerate(zip(args.prompt, outs)):
        ids = [int(t) for t in out if int(t) not in stop]
        prompt_ids = [int(t) for t in prompts[i]]
        added = "".join(generate.stream_text(tokenizer, ids, prefix_ids=prompt_ids))
        print(f"--- prompt {i} ---\n{text}{added}")
    return errors.DONE


def format_figures(result: dict) -> str:
    """`<what> <split>: loss X  perplexity Y  (N target tokens, M batches; checkpoint)`."""
    formats = {"loss": ".4f", "perplexity": ".3f", "accuracy": ".4f"}
    figures = "  ".join(f"{k} {result[k]:{f}}" for k, f in formats.items() if k in result)
    counts = [f"{result[k]:,.0f} {name}" for k, name in (("tokens", "target tokens"),
                                                         ("examples", "examples")) if k in result]
    counts.append(f"{result['batches']} batches")
    return f"{result['label']}: {figures}  ({', '.join(counts)}; {result['checkpoint']})"


def run_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    def body() -> int:
        import jax

        from jaxlm.infer import evaluate
        task = tasks.for_run(args.workdir, overrides)
        result = evaluate.evaluate(task, args.workdir, split=args.split,
                                   max_batches=args.max_batches)
        if jax.process_index() == 0:
            print(json.dumps(result) if args.json else format_figures(result))
        return errors.DONE

    return on_every_process(args, body)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    return run_generate(args, overrides) if args.verb == "generate" else run_eval(args, overrides)
