"""What every verb's `--help` shares: the formatter that shows each option's default, the
text of `--config FILE` and of the `--config.section.key=value` overrides, `--version`, and
a walk over the whole parser tree (jaxlm.cli.build_parser applies the formatter with it).

Imports nothing heavy: `jaxlm <verb> --help` must not import JAX (tests/cli check it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import textwrap
from typing import Iterator

import jaxlm

CONFIG_HELP = ("config file: a Python file whose get_config() returns an "
               "ml_collections.ConfigDict (see configs/*.py)")
# Keys that exist in every config (jaxlm.config.schema); tests/cli apply them to the defaults.
OVERRIDE_EXAMPLE = "--config.train.steps=100 --config.optim.learning_rate=3e-4"


def overrides_epilog(on: str = "the config file's values") -> str:
    """The epilog of a verb that takes `--config.section.key=value` overrides."""
    head = (f"config overrides: --config.SECTION.KEY=VALUE sets one key on top of {on}, "
            f"parsed as the type of the key's current value; repeat for more, e.g.")
    tail = ("An unknown key or a value of the wrong type is exit 2 naming it. `jaxlm config "
            "show` prints the resulting config.")
    return "\n".join([textwrap.fill(head, 88), f"  {OVERRIDE_EXAMPLE}", textwrap.fill(tail, 88)])


def _shows_default(default) -> bool:
    """Whether a default is worth printing: not None, False, "" or [] (nothing set)."""
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    return not (isinstance(default, (str, list, tuple)) and len(default) == 0)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; each option's help ends with its default
    ("(default: X)") unless the help already says what its default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action.default) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(the words that reach it, parser) for `parser` and every sub-parser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def use_formatter(parser: argparse.ArgumentParser) -> None:
    """Formatter on `parser` and every parser below it."""
    for _, sub in walk(parser):
        sub.formatter_class = Formatter


def version_text() -> str:
    """`jaxlm X.Y.Z (jax A, flax B)` from the installed packages' metadata (nothing imported)."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        own = importlib.metadata.version("jaxlm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        own = jaxlm.__version__
    return f"jaxlm {own} (jax {version('jax')}, flax {version('flax')})"


class VersionAction(argparse.Action):
    """`--version`: prints version_text() and exits 0 (the metadata is read only then)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the versions of jaxlm, jax and flax and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text(), file=sys.stdout, flush=True)
        parser.exit(0)
