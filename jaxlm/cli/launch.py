"""`jaxlm launch local ... -- <jaxlm command>`: rehearse a pod on this machine
(jaxlm.launch.local); the arguments after `--` are a whole jaxlm command line."""

from __future__ import annotations

import argparse

from jaxlm.launch import local

VERBS = ("launch",)


def add_parsers(verbs) -> None:
    """The launcher's tree, for `jaxlm --help` (the command line itself goes to
    run_launcher before the main parser: what follows `--` is not jaxlm's to parse)."""
    launch = verbs.add_parser("launch", help="jaxlm launch local --processes N "
                              "--devices-per-process M -- train ...: rehearse a pod on this host",
                              description=local.__doc__, usage=local.USAGE)
    where = launch.add_subparsers(dest="where", required=True)
    local.add_local_arguments(where.add_parser("local", help=local.LOCAL_HELP, usage=local.USAGE,
                                               description=local.__doc__))


def run_launcher(argv: list[str]) -> int:
    return local.main(argv)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    return run_launcher([])  # reached only without `--`: prints the usage, exit 2
