"""`jaxlm <verb>`: the command line, one module per verb group.

    jaxlm train [--config configs/tiny.py] [--config.train.steps=100] [--workdir runs/x]
    jaxlm finetune --config configs/sft_tiny.py [--workdir runs/sft_tiny]
    jaxlm compile --config configs/llama3_8b.py [--topology v5p-128] [--mfu 0.5]
    jaxlm generate --workdir runs/tiny --prompt "import os"
    jaxlm eval --workdir runs/tiny [--split validation]
    jaxlm checkpoint ls|inspect|export-params WORKDIR ...
    jaxlm lora merge runs/lora_tiny --out runs/lora_tiny-merged
    jaxlm convert from-hf|to-hf ...
    jaxlm tokenizer train --config configs/tiny.py --vocab-size 8000 --out tok.model
    jaxlm bench step|data|checkpoint|generate|lora|convert --config configs/bench_cpu.py
    jaxlm launch local --processes 2 --devices-per-process 4 -- train --config configs/tiny.py

Configs follow the ml_collections convention: `--config FILE` names a config file and
`--config.section.key=value` overrides one value (jaxlm.config.overrides).

Owns: the verbs' arguments and the one place errors become exit codes (jaxlm.errors' table,
applied to every verb), one module per verb group:
    train       train, finetune (multi-host start-up before a verb touches a device)
    aot         compile
    infer       generate, eval
    checkpoint  checkpoint ls|inspect|export-params, lora merge
    convert     convert from-hf|to-hf
    tokenizer   tokenizer train
    bench       bench step|data|checkpoint|lora|generate|convert
    launch      launch local
    tasks       which task a config (or a run) runs

May import every package; nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.cli import aot, bench, checkpoint, convert, infer, launch, tokenizer, train

# Each group: add_parsers(verbs) and run(args, overrides) -> exit code, for its VERBS.
GROUPS = (train, aot, infer, checkpoint, convert, tokenizer, bench, launch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for group in GROUPS:
        group.add_parsers(verbs)
    return parser


def report(error: BaseException) -> int:
    """The exit code of an error a command reports as one line (jaxlm.errors), printed;
    anything else is a bug and propagates with its traceback."""
    code = errors.exit_code(error)
    if code is None:
        raise error
    print(f"jaxlm: {error}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # its arguments after `--` are a whole jaxlm command line
        return launch.run_launcher(argv[1:])
    plain, overrides = config_lib.split_overrides(argv)
    args = build_parser().parse_args(plain)
    group = next(g for g in GROUPS if args.verb in g.VERBS)
    try:
        return group.run(args, overrides)
    except Exception as e:  # noqa: BLE001 - the exit-code table decides; bugs propagate
        return report(e)
