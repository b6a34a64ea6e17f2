"""What every family's Hugging Face mapping is made of: tensor rules, the config.json
reading helpers and its error.

config.json is read key by key with a type: `integer` (sizes: a JSON integer >= 1),
`number` (eps, theta, factors: positive and finite; NaN and Infinity, which Python's json
accepts, are refused), `flag` (true or false), `text`, `table`. A missing key takes its
default (or is an error when REQUIRED); null is an error unless transformers gives it a
meaning (e.g. num_key_value_heads: null = num_attention_heads), which the caller passes as
`null=`. Every error is one HFConfigError naming the file and the key.

A `Rule` ties one HF tensor (per layer when its name has `{i}`) to one or more jaxlm
parameters. Import: the HF array, transposed when `transpose` (torch Linear weights are
stored out x in; jaxlm's are in x out), is split into equal parts along its last axis (GPT-2's
fused q|k|v) and each part is copied into its parameter, reshaped in C order (the HF column
index h*K + k is jaxlm's (h, k)). Export does the reverse. A rule with `source` reads that
HF tensor instead of its own name on import (one tensor feeding two parameters: a T5 head
saved as the shared embedding); export writes it under its own name.

Experts: a rule whose name also has `{j}` (Mixtral's and Qwen-MoE's per-expert tensors)
has one HF tensor per layer i and expert j (`experts` of them) for parameters with a leading
layer axis and then an expert axis; its indices are (i, j) pairs.

Layer stacks: a layered rule's parameters carry a leading layer axis, and its layers are
those of its stack, the top-level module of its parameters ("blocks" for decoder-only
families and bert, "encoder_blocks" and "decoder_blocks" for t5). `expand` takes each
stack's depth (jaxlm.convert.params.stack_depths reads them off the model's parameter tree),
so stacks of different depths expand to their own layer counts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_collections

from jaxlm.errors import UserError
from jaxlm.model import counts


class ConversionError(UserError, ValueError):
    """Bad input to a conversion; the message names the file, key or tensor."""


class HFConfigError(ConversionError):
    """config.json describes a model jaxlm cannot reproduce exactly, or holds a value of the
    wrong type; the message names the file and the key."""


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")  # default=REQUIRED: the key must be present
REFUSED = _Marker("REFUSED")  # null=REFUSED: null is an error (transformers gives it no meaning)


def _shown(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read(config: dict, key: str, where: str, default: Any, null: Any, expected: str,
          section: str | None) -> tuple[bool, Any]:
    """(True, value) when config[key] is there and not null; else (False, the value to use:
    `default` when absent, `null` when null), or HFConfigError naming the key."""
    name = f"{section}.{key}" if section else key
    if key not in config:
        if default is REQUIRED:
            raise HFConfigError(f"{where}: missing key {name!r} ({expected})")
        return False, default
    if config[key] is None:
        if null is REFUSED:
            raise HFConfigError(f"{where}: {name} is null; {expected} is expected")
        return False, null
    return True, config[key]


def _bad(where: str, key: str, section: str | None, value: Any, expected: str) -> HFConfigError:
    name = f"{section}.{key}" if section else key
    return HFConfigError(f"{where}: {name}={_shown(value)} is not {expected}")


def integer(config: dict, key: str, where: str, default: Any = REQUIRED, null: Any = REFUSED,
            minimum: int = 1, section: str | None = None) -> Any:
    """config[key] as an int >= minimum (a JSON integer: not a bool, a float or a string);
    `default` when absent, `null` when null (REQUIRED, REFUSED: an error naming the key)."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    present, value = _read(config, key, where, default, null, expected, section)
    if not present:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(where, key, section, value, expected)
    return value


def number(config: dict, key: str, where: str, default: Any = REQUIRED, null: Any = REFUSED,
           section: str | None = None) -> Any:
    """config[key] as a positive finite float (a JSON number, not a bool or a string)."""
    expected = "a positive finite number"
    present, value = _read(config, key, where, default, null, expected, section)
    if not present:
        return value
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise _bad(where, key, section, value, expected)
    return float(value)


def flag(config: dict, key: str, where: str, default: bool) -> bool:
    """config[key] as a bool: JSON true or false (null, 0, "false" are errors)."""
    present, value = _read(config, key, where, default, REFUSED, "true or false", None)
    if present and not isinstance(value, bool):
        raise _bad(where, key, None, value, "true or false")
    return value


def text(config: dict, key: str, where: str, default: Any = REQUIRED, null: Any = REFUSED,
         section: str | None = None) -> Any:
    """config[key] as a string."""
    present, value = _read(config, key, where, default, null, "a string", section)
    if present and not isinstance(value, str):
        raise _bad(where, key, section, value, "a string")
    return value


def table(config: dict, key: str, where: str) -> dict | None:
    """config[key] as a JSON object; None when absent or null."""
    present, value = _read(config, key, where, None, None, "an object", None)
    if present and not isinstance(value, dict):
        raise _bad(where, key, None, value, "an object (or null)")
    return value


def token_ids(config: dict, key: str, where: str) -> list[int]:
    """A special-token id key (bos_token_id, eos_token_id, ...): null or absent (no id), an
    integer >= 0, or a list of them."""
    present, value = _read(config, key, where, None, None, "a token id", None)
    if not present:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise _bad(where, key, None, value, "a token id (an integer >= 0) or a list of them")
    return ids


def require(ok: bool, where: str, key: str, message: str) -> None:
    """HFConfigError "where: key message" ("where: key=value ..." when message starts "=")."""
    if not ok:
        raise HFConfigError(f"{where}: {key}{'' if message.startswith('=') else ' '}{message}")


DEFAULT_STACK = "blocks"  # the stack of a layered rule without parameters (ignorable names)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # the HF tensor name; "{i}" stands for the layer index, "{j}" for the expert's
    hf_shape: tuple[int, ...]
    params: tuple[str, ...]  # jaxlm parameter paths, "/"-joined; a stack's have a layer axis
    transpose: bool = False
    source: str = ""  # import only: the HF tensor read for this rule when it is not `hf`
    experts: int = 0  # a "{j}" rule: the number of experts (the parameters' second axis)

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf

    def name(self, index: Index) -> str:
        """The HF tensor name at `index` (one of `layers(self, ...)`)."""
        if index is None:
            return self.hf
        i, j = index if isinstance(index, tuple) else (index, None)
        return self.hf.format(i=i, j=j)

    @property
    def stack(self) -> str:
        """The layer stack a layered rule spans: its parameters' top-level module."""
        return self.params[0].split("/")[0] if self.params else DEFAULT_STACK

    def part_shape(self) -> tuple[int, ...]:
        """The shape of each parameter's part, in the (transposed) HF layout."""
        shape = self.hf_shape[::-1] if self.transpose else self.hf_shape
        return (*shape[:-1], shape[-1] // len(self.params))


def dims(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """(d_model, heads, kv heads, head_dim, d_ff, vocab)."""
    return (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, counts.head_dim(cfg), cfg.d_ff,
            cfg.vocab_size)


Index = int | tuple[int, int] | None  # where a rule's HF tensor sits in its parameters


def layers(rule: Rule, depths: int | Mapping[str, int]) -> list[Index]:
    """The indices of `rule`'s HF tensors in its parameters: [None] when it is not layered,
    each layer of its stack, or each (layer, expert) of an experts rule; `depths`: each
    stack's number of layers (an int: every stack's)."""
    if not rule.layered:
        return [None]
    if isinstance(depths, int):
        depth = depths
    elif rule.stack not in depths:
        raise ConversionError(f"{rule.hf}: its parameters' layer stack {rule.stack!r} is not "
                              f"part of the model (stacks: {', '.join(depths) or 'none'})")
    else:
        depth = depths[rule.stack]
    if rule.experts:
        return [(i, j) for i in range(depth) for j in range(rule.experts)]
    return list(range(depth))


def expand(rule_list: list[Rule], depths: int | Mapping[str, int]
           ) -> dict[str, tuple[Rule, Index]]:
    """HF tensor name -> (rule, its index: `layers`), every layer of each rule's stack
    spelled out (`depths` as in `layers`)."""
    return {rule.name(index): (rule, index) for rule in rule_list
            for index in layers(rule, depths)}
