"""`jaxlm lm-eval`: a decoder run's newest checkpoint scored by EleutherAI's
lm-evaluation-harness (jaxlm.infer.harness; needs `pip install 'jaxlm[eval]'`).

    jaxlm lm-eval --workdir runs/llama --tasks hellaswag,arc_easy [--num-fewshot 0]
        [--limit N] [--batch-size 8] [--max-gen-toks 256] [--output results.json]
    jaxlm lm-eval --workdir runs/tiny --tasks my_task --include-path my_tasks/

The harness's own tasks read their datasets through Hugging Face `datasets` (downloaded once
into its cache); a local task is a YAML file over local files (`dataset_path: json`,
`dataset_kwargs: {data_files: {test: /path/data.jsonl}}`) in the --include-path directory.
Prints the harness's results table (process 0) and, with --output, writes its results as
JSON. Runs on several processes as `jaxlm eval` does. Exit status 2: bad input (an unknown
task, a run that is not a decoder, the harness not installed).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from jaxlm import errors
from jaxlm.cli import extras
from jaxlm.cli.train import add_multihost_arguments, on_every_process

VERBS = ("lm-eval",)


def add_parsers(verbs) -> None:
    ev = verbs.add_parser("lm-eval", help="score a decoder run with EleutherAI's "
                          "lm-evaluation-harness (its tasks or local task YAML)",
                          description=__doc__)
    ev.add_argument("--workdir", required=True, help="run directory (checkpoints/, tokenizer/)")
    ev.add_argument("--tasks", required=True,
                    help="comma-separated harness task (or group) names")
    ev.add_argument("--include-path", default=None,
                    help="a directory of task YAML files added to the harness's (default: none)")
    ev.add_argument("--num-fewshot", type=int, default=None,
                    help="few-shot examples per request (default: each task's own)")
    ev.add_argument("--limit", type=int, default=None,
                    help="the first N documents of each task (default: all)")
    ev.add_argument("--batch-size", type=int, default=8, help="rows per scoring batch")
    ev.add_argument("--max-gen-toks", type=int, default=256,
                    help="generation tasks: new tokens at most, unless the task sets it")
    ev.add_argument("--output", default=None,
                    help="write the harness's results (JSON) to this file (default: none)")
    add_multihost_arguments(ev)


def check_arguments(args: argparse.Namespace) -> list[str]:
    """The task names; UserError for bad arguments, before anything is loaded."""
    extras.require_harness("jaxlm lm-eval")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise errors.UserError("--tasks: name at least one task")
    for flag, value, low in (("--batch-size", args.batch_size, 1),
                             ("--max-gen-toks", args.max_gen_toks, 1),
                             ("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < low:
            raise errors.UserError(f"{flag} {value}: must be at least {low}")
    if args.output is not None and not pathlib.Path(args.output).parent.is_dir():
        raise errors.UserError(f"--output {args.output}: its directory does not exist")
    return names


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise errors.UserError(f"jaxlm lm-eval takes no config overrides, got {overrides[0]}")
    names = check_arguments(args)

    def body() -> int:
        import jax
        from lm_eval.utils import make_table

        from jaxlm.checkpoint import rundir
        from jaxlm.infer import harness
        from jaxlm.model import zoo

        cfg, _ = rundir.saved_config(args.workdir)
        kind = zoo.family(cfg.model.family).kind
        if kind != "decoder":
            raise errors.UserError(f"{args.workdir}: family {cfg.model.family!r} is an {kind}; "
                                   f"lm-eval scores decoder runs")
        manager = harness.task_manager(names, args.include_path)
        model = harness.load(args.workdir, args.batch_size, args.max_gen_toks)
        results = harness.evaluate(model, names, manager, args.num_fewshot, args.limit)
        if jax.process_index() == 0:
            print(make_table(results))
            if args.output is not None:
                pathlib.Path(args.output).write_text(json.dumps(
                    {k: results[k] for k in ("results", "versions", "n-shot", "config")
                     if k in results}, indent=2, default=str))
        return errors.DONE

    return on_every_process(args, body)
