"""The model zoo: which families exist, what each one requires of a config, what it
counts, which projections LoRA may adapt, and building a model of any family.

A family is a `Family` record here plus its network module (llama.py, gpt2.py), which is
imported when a model is first built: checking a config (the launchers do it on a laptop)
needs no JAX. Adding a family: its network module, its record in FAMILIES, its logical axes
in jaxlm.parallel.rules (if new) and its Hugging Face mapping in jaxlm.convert. Nothing
else (loop, step, tasks) names a family.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import ml_collections

from jaxlm.config import require
from jaxlm.errors import ConfigError
from jaxlm.model import counts

# A projection in every layer: (the block's sub-module, the weight's name, how many of the
# weight's leading dimensions after the layer axis are inputs). wo (heads, head_dim, embed)
# has two input dimensions; the other projections one.
Projection = tuple[str, str, int]
# The attention projections of jaxlm.model.attention.Attention, as LoRA targets.
ATTENTION_TARGETS: dict[str, tuple[Projection, ...]] = {
    "q": (("attn", "wq", 1),), "k": (("attn", "wk", 1),), "v": (("attn", "wv", 1),),
    "o": (("attn", "wo", 2),)}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    describe: str  # one line for help texts and errors
    network: str  # "module:Class" of its nnx.Module, built as Class(model_cfg, rngs)
    validate: Callable[[ml_collections.ConfigDict], None]  # raises ConfigError naming the key
    param_count: Callable[[ml_collections.ConfigDict], int]  # every parameter, analytic
    matmul_params: Callable[[ml_collections.ConfigDict], int]  # weights in matmuls + head (D x V)
    # LoRA target name (config finetune.lora.targets: q, k, v, o, mlp) -> its projections.
    lora_targets: Mapping[str, tuple[Projection, ...]]

    def network_class(self) -> type:
        module, name = self.network.split(":")
        return getattr(importlib.import_module(module), name)


# ---- llama -------------------------------------------------------------------------------

def _llama_validate(cfg: ml_collections.ConfigDict) -> None:
    require(counts.head_dim(cfg) % 2 == 0, "model.head_dim",
            f"rotary embeddings need an even head_dim, got {counts.head_dim(cfg)}")


def _llama_params(cfg: ml_collections.ConfigDict) -> int:
    d, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    h, g, k = cfg.n_heads, cfg.n_kv_heads, counts.head_dim(cfg)
    biases = (h * k + 2 * g * k) if cfg.qkv_bias else 0
    per_layer = counts.attention_params(cfg) + 3 * d * f + 2 * d + biases
    return v * d + n * per_layer + d + (0 if cfg.tie_embeddings else d * v)


LLAMA = Family(
    name="llama",
    describe="LLaMA: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention (also the "
             "Mistral and Qwen2 shapes)",
    network="jaxlm.model.llama:Llama", validate=_llama_validate, param_count=_llama_params,
    matmul_params=lambda cfg: counts.matmul_params(cfg, mlp_matrices=3),
    lora_targets={**ATTENTION_TARGETS,
                  "mlp": (("mlp", "w_gate", 1), ("mlp", "w_up", 1), ("mlp", "w_down", 1))})


# ---- gpt2 --------------------------------------------------------------------------------

def _gpt2_validate(cfg: ml_collections.ConfigDict) -> None:
    require(cfg.n_kv_heads == cfg.n_heads, "model.n_kv_heads",
            "grouped-query attention is not part of family='gpt2' (n_kv_heads must equal "
            "n_heads)")
    require(counts.head_dim(cfg) * cfg.n_heads == cfg.d_model, "model.head_dim",
            "family='gpt2' needs head_dim * n_heads == d_model")
    require(not cfg.qkv_bias, "model.qkv_bias",
            "only for family='llama' (gpt2 has every attention bias already)")


def _gpt2_params(cfg: ml_collections.ConfigDict) -> int:
    d, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    h, g, k = cfg.n_heads, cfg.n_kv_heads, counts.head_dim(cfg)
    biases = h * k + 2 * g * k + d + f + d
    per_layer = counts.attention_params(cfg) + 2 * d * f + biases + 4 * d
    total = v * d + cfg.max_seq_len * d + n * per_layer + 2 * d
    return total + (0 if cfg.tie_embeddings else d * v)


GPT2 = Family(
    name="gpt2",
    describe="GPT-2: LayerNorm, learned positions, GELU MLP, biases",
    network="jaxlm.model.gpt2:GPT2", validate=_gpt2_validate, param_count=_gpt2_params,
    matmul_params=lambda cfg: counts.matmul_params(cfg, mlp_matrices=2),
    lora_targets={**ATTENTION_TARGETS, "mlp": (("mlp", "w_in", 1), ("mlp", "w_out", 1))})


FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GPT2)}


# ---- the registry's API --------------------------------------------------------------------

def family(name: str) -> Family:
    """The family of that name; ConfigError naming config.model.family otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"config.model.family: {name!r} is not a model family; choose one "
                          f"of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def validate(model_cfg: ml_collections.ConfigDict) -> None:
    """The family exists and accepts the model section (its own constraints)."""
    family(model_cfg.family).validate(model_cfg)


def param_count(model_cfg: ml_collections.ConfigDict) -> int:
    """Every parameter, analytic (tests check it against the built model)."""
    return family(model_cfg.family).param_count(model_cfg)


def flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int, *, lm_head: bool = True,
                    frozen: bool = False, adapter_params: int = 0) -> float:
    """Training model FLOPs per token (jaxlm.model.counts)."""
    return counts.train_flops_per_token(
        family(model_cfg.family).matmul_params(model_cfg),
        model_cfg.d_model * model_cfg.vocab_size, model_cfg, seq_len, lm_head=lm_head,
        frozen=frozen, adapter_params=adapter_params)


def build(model_cfg: ml_collections.ConfigDict, rngs: Any) -> Any:
    """The model of `model_cfg` (an nnx.Module), parameters drawn from `rngs` (nnx.Rngs)."""
    return family(model_cfg.family).network_class()(model_cfg, rngs)


def create(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> Any:
    """An unsharded model (tests, tools); training creates it sharded inside a jit."""
    from flax import nnx  # the networks need JAX; checking a config does not
    with nnx.use_eager_sharding(False):  # shardings are applied by jit, from the rules
        return build(model_cfg, nnx.Rngs(params=seed))


def abstract(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> Any:
    """The model's structure with ShapeDtypeStructs for arrays: nothing allocated."""
    from flax import nnx
    return nnx.eval_shape(lambda: create(model_cfg, seed))
