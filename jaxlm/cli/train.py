"""`jaxlm train` and `jaxlm finetune`: a task through the one training loop; `jaxlm distill
cache`: what offline distillation reads.

    jaxlm train [--config configs/tiny.py] [--workdir runs/tiny] [--config.k=v ...]
    jaxlm finetune --config configs/sft_tiny.py [--workdir runs/sft_tiny] [--config.k=v ...]
    jaxlm distill cache [--config configs/distill_tiny.py] --out DIR [--top-k 64] [--steps N]

`distill cache` writes a teacher's top-k predictions on the config's training batches
(jaxlm.compress.distill_cache), on every process of a multi-host run.

Train and finetune resume from the workdir's latest checkpoint. Exit codes (jaxlm.errors):
0 done; 2 bad input (the message names the key, file:line or checkpoint; another run holds
the workdir; a resume the run's config or tokenizer forbids); 3 non-finite loss
(train.nonfinite=stop); 74 checkpoint storage failed mid-run; 75 preempted by
SIGTERM/SIGINT (after saving a checkpoint, or during start-up with nothing to save; run
again to resume); 130 a second signal aborted without saving.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Callable

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.cli import helptext
from jaxlm.parallel import distributed

VERBS = ("train", "finetune", "distill")
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py"


def add_multihost_arguments(parser: argparse.ArgumentParser) -> None:
    """Multi-host start-up (jaxlm.parallel.distributed); without them SLURM or a TPU VM is
    detected."""
    parser.add_argument("--coordinator", default=None,
                        help="HOST:PORT of process 0 (multi-host; default: detected)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="processes of the run (default: detected, else 1)")
    parser.add_argument("--process-id", type=int, default=None,
                        help="this process, 0..N-1 (default: detected, else 0)")


def add_parsers(verbs) -> None:
    train = verbs.add_parser("train", help="pretrain (resumes from the workdir's latest checkpoint)",
                             description=__doc__, epilog=helptext.overrides_epilog())
    add_config_argument(train)
    train.add_argument("--workdir", default=None, help="run directory (default runs/<config name>)")
    add_multihost_arguments(train)
    ft = verbs.add_parser("finetune", help="fine-tune a checkpoint: SFT, LoRA, classification "
                          "(resumes from the workdir's latest checkpoint)", description=__doc__,
                          epilog=helptext.overrides_epilog())
    ft.add_argument("--config", required=True,
                    help=f"{helptext.CONFIG_HELP}; required (configs/sft_tiny.py, ...)")
    ft.add_argument("--workdir", default=None, help="run directory (default runs/<config name>)")
    add_multihost_arguments(ft)
    dist = verbs.add_parser("distill", help="offline distillation: cache a teacher's "
                            "predictions", description=__doc__)
    actions = dist.add_subparsers(dest="action", required=True, metavar="ACTION")
    cache = actions.add_parser(
        "cache", help="write the teacher's top-k logits on the config's training batches",
        description="Runs config.distill.teacher over the first --steps global batches the "
        "config's `jaxlm train` reads and writes each position's --top-k largest logits "
        "(jaxlm/compress/distill_cache.py); train with --config.distill.cache=OUT.",
        epilog=helptext.overrides_epilog())
    add_config_argument(cache)
    cache.add_argument("--out", required=True, help="directory to create (new or empty)")
    cache.add_argument("--top-k", type=int, default=64,
                       help="logits kept per position (the vocabulary size: all of them)")
    cache.add_argument("--steps", type=int, default=None,
                       help="global batches to cache (default: the config's train.steps)")
    add_multihost_arguments(cache)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """`--config FILE`, configs/tiny.py when not given."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"{helptext.CONFIG_HELP} (default: configs/{DEFAULT_CONFIG.name})")


def on_every_process(args: argparse.Namespace, body: Callable[[], int]) -> int:
    """Starts the multi-host runtime (before anything touches a device), then runs `body`.
    With several processes, an error that is not bad input leaves at once, so the other
    processes learn of it within one heartbeat timeout instead of waiting in a collective
    (bad input fails alike on every process and is reported as usual)."""
    plan = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if plan.kind != "single":
        print(f"jaxlm: multi-host start-up: {plan.describe()}", file=sys.stderr, flush=True)
    try:
        return body()
    except Exception as e:  # noqa: BLE001 - reported by the exit-code table, or a bug
        import jax
        if jax.process_count() > 1 and errors.exit_code(e) is None:
            distributed.exit_now(errors.PYTHON_ERROR)
        raise


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxlm.cli import tasks
    from jaxlm.train import loop, preemption
    config_path = args.config or DEFAULT_CONFIG
    cfg = config_lib.load(config_path, overrides)
    if args.verb == "distill":
        from jaxlm.compress import distill_cache

        def cache() -> int:
            distill_cache.cache_run(cfg, args.out, args.top_k, args.steps)
            return errors.DONE

        return on_every_process(args, cache)
    workdir = args.workdir or f"runs/{pathlib.Path(config_path).stem}"

    def body() -> int:
        task = tasks.finetuning(cfg, workdir) if args.verb == "finetune" else \
            tasks.pretraining(cfg)
        loop.train(task, workdir, tasks.evaluations(task))
        return errors.DONE

    with preemption.watch():  # a signal in the start-up exits 75 (nothing to save), not 143
        return on_every_process(args, body)
