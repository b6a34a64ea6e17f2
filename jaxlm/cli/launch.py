"""`jaxlm launch local ... -- <jaxlm command>`: rehearse a pod on this machine
(jaxlm.launch.local); the arguments after `--` are a whole jaxlm command line."""

from __future__ import annotations

import argparse

VERBS = ("launch",)


def add_parsers(verbs) -> None:
    verbs.add_parser("launch", help="jaxlm launch local --processes N --devices-per-process M -- "
                     "train ...: rehearse a pod on this host (see jaxlm/launch/local.py)")


def run_launcher(argv: list[str]) -> int:
    from jaxlm.launch import local
    return local.main(argv)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    return run_launcher([])  # reached only without `--`: prints the usage, exit 2
