"""`jaxlm <verb>`: the command line, one module per verb group.

    jaxlm train [--config configs/tiny.py] [--config.train.steps=100] [--workdir runs/x]
    jaxlm finetune --config configs/sft_tiny.py [--workdir runs/sft_tiny]
    jaxlm distill cache --config configs/distill_tiny.py --out runs/teacher-top64 [--top-k 64]
    jaxlm compile --config configs/llama3_8b.py [--topology v5p-128] [--mfu 0.5]
    jaxlm plan --config configs/llama3_8b.py [--topology v5p-128] [--budget 840]
    jaxlm generate --workdir runs/tiny --prompt "import os"
    jaxlm eval --workdir runs/tiny [--split validation]
    jaxlm lm-eval --workdir runs/tiny --tasks TASKS [--include-path DIR] [--limit N]
    jaxlm classify --workdir runs/classify_tiny --text "import os" [--jsonl FILE] [--json]
    jaxlm checkpoint ls|inspect|export-params WORKDIR ...
    jaxlm lora merge runs/lora_tiny --out runs/lora_tiny-merged
    jaxlm quantize --workdir runs/tiny --out runs/tiny-int8 --weights int8
    jaxlm prune --workdir runs/tiny --out runs/tiny-pruned --layers 2
    jaxlm convert from-hf|to-hf ...
    jaxlm tokenizer train --config configs/tiny.py --vocab-size 8000 --out tok.model
    jaxlm bench step|data|checkpoint|generate|lora|convert --config configs/bench_cpu.py
    jaxlm launch local --processes 2 --devices-per-process 4 -- train --config configs/tiny.py
    jaxlm config show --config configs/tiny.py [--config.train.steps=100] [--json]
    jaxlm config show --workdir runs/tiny
    jaxlm --version;  jaxlm VERB --help (every option with its default)

Configs follow the ml_collections convention: `--config FILE` names a config file and
`--config.section.key=value` overrides one value (jaxlm.config.overrides).

Owns: the verbs' arguments and the one place errors become exit codes (jaxlm.errors' table,
applied to every verb), one module per verb group:
    train       train, finetune, distill cache (multi-host start-up before a verb touches a
                device)
    aot         compile, plan
    infer       generate, eval, classify
    harness     lm-eval (EleutherAI's lm-evaluation-harness on a run)
    checkpoint  checkpoint ls|inspect|export-params, lora merge, quantize, prune
    convert     convert from-hf|to-hf
    tokenizer   tokenizer train
    bench       bench step|data|checkpoint|lora|generate|convert
    launch      launch local
    config      config show (the resolved, validated config of a file or of a run)
    tasks       which task a config (or a run) runs, and what the loop evaluates beside it
    extras      the optional extras a verb or config key needs (checked without JAX)
    helptext    what every --help shares: defaults shown, override syntax, --version

Every verb takes --verbose (jaxlm.console): library output shows too.

May import every package; nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from jaxlm import config as config_lib
from jaxlm import console, errors
from jaxlm.cli import helptext, launch
from jaxlm.parallel import distributed

# Each group: add_parsers(verbs) and run(args, overrides) -> exit code, for its VERBS.
# Imported when the command line is parsed, after `main` has set up what must come first.
# A group imports what touches JAX (tasks, checkpoints, models) inside its run functions:
# --help and bad arguments never import JAX (tests/cli/test_help.py), and a training
# verb's start-up signal handler is in place before the slow imports begin.
GROUP_NAMES = ("train", "aot", "infer", "harness", "checkpoint", "convert", "tokenizer", "bench",
               "launch", "config")
TRAINING_VERBS = ("train", "finetune")
# Verbs on one process that use a device: their backends start before the verb runs
# (train, finetune and eval start theirs after the multi-host runtime).
BACKEND_VERBS = ("generate", "classify", "bench", "convert", "lora", "quantize", "prune")


def groups() -> list:
    return [importlib.import_module(f"jaxlm.cli.{name}") for name in GROUP_NAMES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxlm", description=sys.modules["jaxlm"].__doc__,
        epilog="`jaxlm VERB --help` lists a verb's options with their defaults.\n\n" +
        helptext.overrides_epilog())
    parser.add_argument("--version", action=helptext.VersionAction)
    parser.add_argument("--verbose", action="store_true",
                        help="show library output too (libtpu, TFDS, absl, Orbax, Gloo); "
                             "accepted anywhere on the command line (default: off)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for group in groups():
        group.add_parsers(verbs)
    helptext.use_formatter(parser)
    return parser


def _preempted_during_startup(signum: int, frame) -> None:
    """A training command's first handler, until its watch (jaxlm.train.preemption) takes
    over: a signal while the command still imports and reads its config ends it with the
    preemption code, as a signal later in its start-up does."""
    name = signal.Signals(signum).name
    print(f"jaxlm: {errors.Preempted(None, signal_name=name)}", file=sys.stderr, flush=True)
    os._exit(errors.PREEMPTED)


def report(error: BaseException) -> int:
    """The exit code of an error a command reports as one line (jaxlm.errors), printed;
    anything else is a bug and propagates with its traceback."""
    code = errors.exit_code(error)
    if code is None:
        raise error
    print(f"jaxlm: {error}", file=sys.stderr, flush=True)
    if code == errors.STORAGE:
        # The failed write's library threads are still winding down; a normal interpreter
        # exit would print their errors after this line. Everything jaxlm writes is closed.
        sys.stdout.flush()
        os._exit(code)
    return code


def verbosity(argv: list[str]) -> list[str]:
    """`--verbose` anywhere before a `--` (jaxlm --verbose train ..., jaxlm train ... --verbose)
    lets library output through, in this process and every process it starts
    (jaxlm.console); the rest of the command line is returned."""
    cut = argv.index("--") if "--" in argv else len(argv)
    if "--verbose" in argv[:cut]:
        console.set_verbose()
        argv = [a for a in argv[:cut] if a != "--verbose"] + argv[cut:]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = verbosity(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] and argv[0] in TRAINING_VERBS:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _preempted_during_startup)
    console.quiet_libraries()
    if argv[:1] == ["launch"]:  # its arguments after `--` are a whole jaxlm command line
        return launch.run_launcher(argv[1:])
    plain, overrides = config_lib.split_overrides(argv)
    args = build_parser().parse_args(plain)
    group = next(g for g in groups() if args.verb in g.VERBS)
    try:
        if args.verb in BACKEND_VERBS:
            distributed.start_backends()  # quietly; the multi-host verbs start theirs later
        return group.run(args, overrides)
    except Exception as e:  # noqa: BLE001 - the exit-code table decides; bugs propagate
        return report(e)
    finally:
        if args.verb in TRAINING_VERBS:  # the start-up handler is not the shutdown's
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
