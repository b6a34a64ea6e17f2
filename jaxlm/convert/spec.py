"""What every family's Hugging Face mapping is made of: tensor rules, the config.json
reading helpers and its error.

A `Rule` ties one HF tensor (per layer when its name has `{i}`) to one or more jaxlm
parameters. Import: the HF array, transposed when `transpose` (torch Linear weights are
stored out x in; jaxlm's are in x out), is split into equal parts along its last axis (GPT-2's
fused q|k|v) and each part is copied into its parameter, reshaped in C order (the HF column
index h*K + k is jaxlm's (h, k)). Export does the reverse.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from jaxlm.errors import UserError
from jaxlm.model import counts


class HFConfigError(UserError, ValueError):
    """config.json describes a model jaxlm cannot reproduce exactly; the message names the key."""


def get(config: dict, key: str, where: str) -> Any:
    """config[key]; HFConfigError naming it when it is missing or null."""
    if key not in config or config[key] is None:
        raise HFConfigError(f"{where}: missing key {key!r}")
    return config[key]


def require(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise HFConfigError(f"{where}: {key} {message}")


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # the HF tensor name; "{i}" stands for the layer index
    hf_shape: tuple[int, ...]
    params: tuple[str, ...]  # jaxlm parameter paths, "/"-joined; "blocks/..." have a layer axis
    transpose: bool = False

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf

    def part_shape(self) -> tuple[int, ...]:
        """The shape of each parameter's part, in the (transposed) HF layout."""
        shape = self.hf_shape[::-1] if self.transpose else self.hf_shape
        return (*shape[:-1], shape[-1] // len(self.params))


def dims(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """(d_model, heads, kv heads, head_dim, d_ff, vocab)."""
    return (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, counts.head_dim(cfg), cfg.d_ff,
            cfg.vocab_size)


def expand(rule_list: list[Rule], n_layers: int) -> dict[str, tuple[Rule, int | None]]:
    """HF tensor name -> (rule, layer index or None), every layer spelled out."""
    named: dict[str, tuple[Rule, int | None]] = {}
    for rule in rule_list:
        if rule.layered:
            named.update({rule.hf.format(i=i): (rule, i) for i in range(n_layers)})
        else:
            named[rule.hf] = (rule, None)
    return named
