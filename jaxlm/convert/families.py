"""Which Hugging Face model types each jaxlm model family reads and writes, and the calls
that go to the family's mapping (llama.py, moe.py, gpt2.py, bert.py, t5.py): config.json in
both directions and the tensor rules.

Adding a family's Hugging Face mapping: a module jaxlm/convert/<family>.py with
MODEL_TYPES, config_from_hf, config_to_hf, rules and ignorable, and its model types in
MODEL_TYPES here (the module is imported when first used).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterable

import ml_collections

from jaxlm import config as config_lib
from jaxlm.convert.spec import HFConfigError, Rule, integer, require

# jaxlm family -> the Hugging Face model types its mapping (jaxlm/convert/<family>.py) reads
MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mistral", "qwen2"), "moe": ("mixtral", "qwen2_moe"), "gpt2": ("gpt2",),
    "bert": ("bert", "roberta"), "t5": ("t5", "mt5")}
MAPPINGS = tuple(MODEL_TYPES)  # the families with a mapping
SUPPORTED = tuple(t for types in MODEL_TYPES.values() for t in types)


def mapping(family: str) -> ModuleType:
    if family not in MODEL_TYPES:
        raise HFConfigError(f"model family {family!r} has no Hugging Face mapping (jaxlm maps "
                            f"{', '.join(MAPPINGS)})")
    module = importlib.import_module(f"jaxlm.convert.{family}")
    assert module.MODEL_TYPES == MODEL_TYPES[family], family  # one list, kept in step
    return module


def model_config(config: dict, where: str = "config.json"
                 ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(jaxlm model config, notes for the user) of a Hugging Face config.json (parsed);
    `where` (its path) starts every error message."""
    if not isinstance(config, dict):
        raise HFConfigError(f"{where}: not a JSON object (got {type(config).__name__})")
    model_type = config.get("model_type")
    family = next((f for f, types in MODEL_TYPES.items() if model_type in types), None)
    if family is None:
        raise HFConfigError(f"{where}: unsupported architecture model_type={model_type!r} "
                            f"(architectures {config.get('architectures')}); jaxlm converts "
                            f"{', '.join(SUPPORTED)}")
    cfg = config_lib.defaults().model
    cfg.family = family
    cfg.dtype = "float32"
    notes: list[str] = []
    mapping(family).config_from_hf(config, cfg, where, notes)
    cfg.vocab_size = integer(config, "vocab_size", where)
    require(cfg.n_heads % cfg.n_kv_heads == 0, where, "num_key_value_heads",
            f"={cfg.n_kv_heads} does not divide num_attention_heads={cfg.n_heads}")
    return cfg, notes


def hf_config(model_cfg: ml_collections.ConfigDict, dtype: str,
              special: dict[str, int | None]) -> dict[str, Any]:
    """The config.json of a jaxlm model (its family writes the architecture's keys)."""
    m = model_cfg
    base = {"bos_token_id": special.get("bos_id"), "eos_token_id": special.get("eos_id"),
            "pad_token_id": special.get("pad_id"), "tie_word_embeddings": bool(m.tie_embeddings),
            "vocab_size": int(m.vocab_size), "torch_dtype": dtype, "use_cache": True}
    return mapping(m.family).config_to_hf(m, base)


def rules(model_cfg: ml_collections.ConfigDict, tensor_names: Iterable[str] | None = None
          ) -> list[Rule]:
    """Every tensor of the model's Hugging Face checkpoint, in the order HF writes them;
    `tensor_names` (a checkpoint's, on import) tells layouts of one architecture apart."""
    return mapping(model_cfg.family).rules(model_cfg, tensor_names)


def ignorable(model_cfg: ml_collections.ConfigDict, tensor_names: Iterable[str] | None = None
              ) -> list[str]:
    """Tensors a checkpoint may hold that carry no parameter."""
    return mapping(model_cfg.family).ignorable(model_cfg, tensor_names)
