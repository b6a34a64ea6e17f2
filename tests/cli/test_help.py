"""Every verb's `--help`: exits 0 (the launcher's too), documents every option with its
default, shows the `--config.KEY=VALUE` override syntax where a config is read, and imports
no JAX; `jaxlm --version`. A new option without help fails here."""

import argparse
import importlib.metadata
import re
import subprocess
import sys

import pytest

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.cli import launch

EXAMPLE = "--config.train.steps=100 --config.optim.learning_rate=3e-4"
# Verbs that read a config without a --config option: the run's saved config.
SAVED_CONFIG_VERBS = {("generate",), ("eval",), ("classify",)}


def run_cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def every_parser(parser, path=()):
    """(path, parser) for the whole tree under `parser` (the same walk as the CLI's)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_parser(sub, (*path, name))


PARSERS = dict(every_parser(cli.build_parser()))


def show_help(path, capsys) -> str:
    """`jaxlm PATH --help` as main dispatches it (the launcher before argparse)."""
    with pytest.raises(SystemExit) as exit_:
        if path[:1] == ("launch",):
            launch.run_launcher([*path[1:], "--help"])
        else:
            cli.build_parser().parse_args([*path, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    return out


def shows_default(default) -> bool:
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    return not (isinstance(default, (str, list, tuple)) and len(default) == 0)


def undocumented(parser) -> list[str]:
    """Options (and positionals, and sub-commands) of `parser` without help, or whose help
    does not show a default that is set."""
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            continue
        if not action.help or action.help is argparse.SUPPRESS:
            missing.append(f"{name}: no help")
            continue
        text = " ".join(formatter._expand_help(action).split())
        if shows_default(action.default) and not ("default" in text and
                                                  str(action.default) in text):
            missing.append(f"{name}: default {action.default!r} not shown in {text!r}")
    return missing


@pytest.mark.parametrize("path", list(PARSERS), ids=lambda p: " ".join(p) or "jaxlm")
def test_help_exits_0_and_documents_every_option(path, capsys):
    out = show_help(path, capsys)
    assert out.startswith("usage: jaxlm")
    parser = PARSERS[path]
    assert undocumented(parser) == []
    option_strings = {s for a in parser._actions for s in a.option_strings}
    if "--config" in option_strings or path in SAVED_CONFIG_VERBS or path == ():
        assert EXAMPLE in " ".join(out.split()), out  # the override syntax, with an example
    if path == ("launch", "local"):
        assert "--devices-per-process" in out and "--grace" in out


def test_the_help_override_example_names_real_keys():
    from jaxlm.cli import helptext
    cfg = config_lib.defaults()
    config_lib.apply_overrides(cfg, helptext.OVERRIDE_EXAMPLE.split())
    assert (cfg.train.steps, cfg.optim.learning_rate) == (100, 3e-4)
    assert helptext.OVERRIDE_EXAMPLE == EXAMPLE


def test_launch_local_help_through_the_command_line():
    result = run_cli("-m", "jaxlm.cli", "launch", "local", "--help")
    assert result.returncode == 0, result.stderr
    assert "--processes" in result.stdout and "--devices-per-process" in result.stdout
    assert "(default: 40.0)" in result.stdout


def test_version():
    result = run_cli("-m", "jaxlm.cli", "--version")
    assert result.returncode == 0, result.stderr
    versions = re.fullmatch(r"jaxlm (\S+) \(jax (\S+), flax (\S+)\)\n", result.stdout)
    assert versions, result.stdout
    assert versions.groups()[1:] == (importlib.metadata.version("jax"),
                                     importlib.metadata.version("flax"))
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", versions.group(1))


def test_help_imports_no_jax_and_its_copied_constants_agree():
    """`--help` stays fast: JAX is imported by the verbs, not by the parser (whose few
    constants are copies of the modules' own, checked here)."""
    result = run_cli("-X", "importtime", "-m", "jaxlm.cli", "train", "--help")
    assert result.returncode == 0, result.stderr
    heavy = [line for line in result.stderr.splitlines()
             if re.search(r"\|\s+(jax|jaxlib|flax|orbax|optax)(\.|$)", line)]
    assert heavy == [], heavy[:5]

    from jaxlm.checkpoint import export
    from jaxlm.cli import checkpoint as checkpoint_cli
    from jaxlm.cli import convert as convert_cli
    from jaxlm.convert import hf_export
    assert tuple(checkpoint_cli.EXPORT_DTYPES) == tuple(export.EXPORT_DTYPES)
    assert tuple(convert_cli.EXPORT_DTYPES) == tuple(hf_export.EXPORT_DTYPES)
    assert convert_cli.DEFAULT_MAX_SHARD == hf_export.DEFAULT_MAX_SHARD
    from jaxlm.compress import prune
    assert tuple(checkpoint_cli.PRUNE_METHODS) == tuple(prune.METHODS)
