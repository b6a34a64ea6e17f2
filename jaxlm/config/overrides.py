"""Config files and the one override parser.

    --config FILE                 a Python file whose get_config() returns the config
    --config.section.key=value    one value, parsed as the type of the key's default

Every command that takes overrides (train, finetune, generate, eval, the launchers) parses
them here; an unknown key or a value of the wrong type is a ConfigError naming it.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import traceback
from typing import Sequence

import ml_collections

from jaxlm.errors import ConfigError

PREFIX = "--config."
# Keys that moved (old name -> new name): named in the unknown-key error, and read from a
# run's saved config under their new name (jaxlm.checkpoint.rundir.config_of).
MOVED = {"finetune.eval_every": "train.eval_every"}


def unknown_key(dotted: str) -> ConfigError:
    """The error for `config.<dotted>`, naming the key's new name if it moved."""
    moved = MOVED.get(dotted)
    return ConfigError(f"unknown config key: config.{dotted}"
                       + (f" (it moved: use config.{moved})" if moved else ""))


def move_keys(tree: dict) -> None:
    """Renames the MOVED keys of a nested dict in place (a config saved before the move)."""
    for old, new in MOVED.items():
        *path, leaf = old.split(".")
        node = tree
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            *new_path, new_leaf = new.split(".")
            target = tree
            for name in new_path:
                target = target.setdefault(name, {})
            target.setdefault(new_leaf, value)


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`. No other side effects. Any
    failure inside the file (a syntax error, a value of the wrong type for its key, a
    name it lacks) is a ConfigError naming the file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxlm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} defines no get_config()")
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the file is input: whatever it raises is bad input
        raise ConfigError(f"{path}{_line_in(e, path)}: {_summary(e)}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned a {type(cfg).__name__}, not an "
                          f"ml_collections.ConfigDict")
    return cfg


def _line_in(error: BaseException, path: pathlib.Path) -> str:
    """":<line>" of the innermost place in `path` the error passed through, or ""."""
    if isinstance(error, SyntaxError) and error.lineno and \
            pathlib.Path(error.filename or "").resolve() == path.resolve():
        return f":{error.lineno}"
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if pathlib.Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    return f":{line}" if line else ""


def _summary(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg}"
    text = " ".join(str(error).split())
    # ml_collections: "Could not override field 'steps' (reference). ten is of original
    # type <class 'str'> and cannot be casted to type <class 'int'>"
    return f"{type(error).__name__}: {text}"


def merge_overrides(base: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict,
                    prefix: str = "config") -> None:
    """Copies `overrides` into `base`; a key `base` lacks is an error naming it."""
    for key, value in overrides.items():
        name = f"{prefix}.{key}"
        if key not in base:
            raise unknown_key(name.removeprefix("config."))
        if isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"{name} is a section; set its keys, not the section")
            merge_overrides(base[key], ml_collections.ConfigDict(value), name)
        else:
            base[key] = value


def parse_value(key: str, text: str, current):
    """Parses `text` as the type of the key's current value."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"config.{key}: expected true or false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config.{key}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config.{key}: expected a number, got {text!r}") from None
    if isinstance(current, str) or current is None:
        return text
    return ast.literal_eval(text)


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets `section.key` (dotted, without the "config." prefix) from its text."""
    *sections, leaf = dotted.split(".")
    node = cfg
    for i, name in enumerate(sections):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise unknown_key(".".join(sections[:i + 1]))
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise unknown_key(dotted)
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"config.{dotted} is a section; set one of its keys")
    node[leaf] = parse_value(dotted, text, node[leaf])


def check_override(item: str) -> tuple[str, str]:
    """("section.key", "value") of one `--config.section.key=value` argument."""
    if not item.startswith(PREFIX) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like --config.key=value")
    dotted, text = item.split("=", 1)
    return dotted[len(PREFIX):], text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `--config.section.key=value` arguments in order."""
    for item in overrides:
        apply_override(cfg, *check_override(item))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the `--config.` overrides) of a command line."""
    return ([a for a in argv if not a.startswith(PREFIX)],
            [a for a in argv if a.startswith(PREFIX)])


def load(config_path: str | pathlib.Path, overrides: Sequence[str] = ()
         ) -> ml_collections.ConfigDict:
    """A config file with the overrides applied (not yet validated)."""
    cfg = load_config_file(config_path)
    apply_overrides(cfg, overrides)
    return cfg
