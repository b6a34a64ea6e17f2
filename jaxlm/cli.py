"""`jaxlm <verb>`: the command line.

Configs follow the ml_collections convention: `--config FILE` names a config file and
`--config.section.key=value` overrides one value (parsed as the type of its default).

    jaxlm train [--config configs/tiny.py] [--config.train.steps=100] [--workdir runs/x]
    jaxlm bench step --config configs/bench_cpu.py
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

import ml_collections

from jaxlm import config as config_lib

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def parse_value(key: str, text: str, current):
    """Parses `text` as the type of the key's current value."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise config_lib.ConfigError(f"config.{key}: expected true or false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise config_lib.ConfigError(f"config.{key}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise config_lib.ConfigError(f"config.{key}: expected a number, got {text!r}") from None
    if isinstance(current, str) or current is None:
        return text
    return ast.literal_eval(text)


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    *sections, leaf = dotted.split(".")
    node = cfg
    for i, name in enumerate(sections):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise config_lib.ConfigError(f"unknown config key: config.{'.'.join(sections[:i + 1])}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise config_lib.ConfigError(f"unknown config key: config.{dotted}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise config_lib.ConfigError(f"config.{dotted} is a section; set one of its keys")
    node[leaf] = parse_value(dotted, text, node[leaf])


def load_config(config_path: str | None, overrides: list[str]) -> ml_collections.ConfigDict:
    cfg = config_lib.load_config_file(config_path or DEFAULT_CONFIG)
    for item in overrides:
        if "=" not in item:
            raise config_lib.ConfigError(f"override {item!r} must look like --config.key=value")
        dotted, text = item.split("=", 1)
        apply_override(cfg, dotted[len("--config."):], text)
    return cfg


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="pretrain (resumes from the workdir's latest checkpoint)")
    train.add_argument("--config", default=None, help=f"config file (default {DEFAULT_CONFIG.name})")
    train.add_argument("--workdir", default=None, help="run directory (default runs/<config name>)")
    bench = verbs.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("what", choices=["step"])
    bench.add_argument("--config", default=None)
    bench.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plain, overrides = split_overrides(argv)
    args = build_parser().parse_args(plain)
    try:
        cfg = load_config(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    try:
        if args.verb == "train":
            from jaxlm.train import loop
            name = pathlib.Path(args.config or DEFAULT_CONFIG).stem
            loop.train(cfg, args.workdir or f"runs/{name}")
        elif args.verb == "bench":
            from jaxlm import bench
            bench.bench_step(cfg, steps=args.steps)
    except config_lib.ConfigError as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
