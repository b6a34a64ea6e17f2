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
    # The Transformer's shape: "decoder" (causal LM), "encoder" (bidirectional, masked LM)
    # or "encoder_decoder" (seq2seq); each objective and task says which it trains.
    kind: str = "decoder"
    # Attention score and value matmuls per trained token, forward and backward; default:
    # causal self-attention over data.seq_len (counts.attention_flops_per_token).
    attention_flops: Callable[[ml_collections.ConfigDict, int], float] | None = None

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


# ---- moe ---------------------------------------------------------------------------------

def _moe_validate(cfg: ml_collections.ConfigDict) -> None:
    _llama_validate(cfg)
    require(cfg.weights == "float", "model.weights",
            f"{cfg.weights!r}: quantized weights are not yet built for the experts of family 'moe'")


def expert_width(cfg: ml_collections.ConfigDict) -> int:
    """moe: each expert's hidden width (model.d_expert, or d_ff when it is 0)."""
    return cfg.d_expert or cfg.d_ff


def _moe_mlp(cfg: ml_collections.ConfigDict, experts: int) -> int:
    """A layer's router, `experts` SwiGLU experts, its shared expert and gate."""
    d = cfg.d_model
    return (d * cfg.n_experts + experts * 3 * d * expert_width(cfg) + 3 * d * cfg.d_shared
            + (d if cfg.shared_gate else 0))


def _moe_params(cfg: ml_collections.ConfigDict) -> int:
    return _llama_params(cfg) + cfg.n_layers * (_moe_mlp(cfg, cfg.n_experts) - 3 * cfg.d_model
                                                * cfg.d_ff)


MOE = Family(
    name="moe",
    describe="mixture of experts: the LLaMA block with a top-k routed mixture of SwiGLU "
             "experts (and shared experts) as its MLP (Mixtral, Qwen-MoE shapes)",
    network="jaxlm.model.moe:LlamaMoE", validate=_moe_validate, param_count=_moe_params,
    # What a token runs through: its k experts (the active parameters), as FLOPs count.
    matmul_params=lambda cfg: counts.matmul_params(cfg, mlp_matrices=0)
    + cfg.n_layers * _moe_mlp(cfg, cfg.experts_per_token),
    lora_targets=ATTENTION_TARGETS)


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


# ---- bert --------------------------------------------------------------------------------

def _bert_validate(cfg: ml_collections.ConfigDict) -> None:
    require(cfg.n_kv_heads == cfg.n_heads, "model.n_kv_heads",
            "grouped-query attention is not part of family='bert' (n_kv_heads must equal "
            "n_heads)")
    require(cfg.tie_embeddings, "model.tie_embeddings",
            "family='bert' ties its masked-LM head to the embedding (must be true)")
    require(cfg.activation in ("gelu", "gelu_tanh", "relu") and not cfg.gated_mlp,
            "model.gated_mlp", "family='bert' has a plain (not gated) MLP")
    require(cfg.position_offset < cfg.max_seq_len, "model.position_offset",
            f"{cfg.position_offset} leaves no row of the {cfg.max_seq_len}-row position table")


def _bert_params(cfg: ml_collections.ConfigDict) -> int:
    """Embeddings (tokens, positions, token types) + their LayerNorm; per layer attention
    with biases, post-attention LayerNorm, MLP with biases, post-MLP LayerNorm; the masked-LM
    head (dense D x D + bias, LayerNorm, output bias V; its matrix is the embedding)."""
    d, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    h, k = cfg.n_heads, counts.head_dim(cfg)
    per_layer = counts.attention_params(cfg) + 3 * h * k + d + 2 * d * f + f + d + 4 * d
    embeddings = (v + cfg.max_seq_len + cfg.type_vocab_size) * d + 2 * d
    return embeddings + n * per_layer + d * d + d + 2 * d + v


BERT = Family(
    name="bert",
    describe="BERT/RoBERTa encoder: bidirectional attention, learned positions, token types, "
             "post-LayerNorm, GELU MLP, masked-LM head tied to the embedding",
    network="jaxlm.model.bert:Bert", validate=_bert_validate, param_count=_bert_params,
    # the MLM head's D x D transform is a matmul too
    matmul_params=lambda cfg: counts.matmul_params(cfg, mlp_matrices=2) + cfg.d_model ** 2,
    lora_targets={**ATTENTION_TARGETS, "mlp": (("mlp", "w_in", 1), ("mlp", "w_out", 1))},
    kind="encoder",
    attention_flops=lambda cfg, seq_len: counts.attention_flops_per_token(
        cfg, seq_len, causal=False))


# ---- t5 ----------------------------------------------------------------------------------

def _t5_validate(cfg: ml_collections.ConfigDict) -> None:
    require(cfg.n_kv_heads == cfg.n_heads, "model.n_kv_heads",
            "grouped-query attention is not part of family='t5' (n_kv_heads must equal "
            "n_heads)")
    require(cfg.activation in ("gelu_tanh", "relu", "gelu"), "model.activation",
            f"{cfg.activation!r} is not a T5 activation")
    require(cfg.attention in ("auto", "xla"), "model.attention",
            "family='t5' runs its attention (with the relative-position bias) on the 'xla' "
            "backend only ('auto' means xla for t5)")
    require(cfg.relative_buckets >= 4, "model.relative_buckets",
            f"T5's buckets need at least 4 (half exact, half logarithmic), got "
            f"{cfg.relative_buckets}")
    require(cfg.relative_max_distance > cfg.relative_buckets // 2, "model.relative_max_distance",
            f"must exceed half the buckets ({cfg.relative_buckets // 2}), got "
            f"{cfg.relative_max_distance}")


def decoder_layers(cfg: ml_collections.ConfigDict) -> int:
    """t5: model.n_decoder_layers, or n_layers when it is 0."""
    return cfg.n_decoder_layers or cfg.n_layers


def _t5_params(cfg: ml_collections.ConfigDict) -> int:
    """Shared embedding; encoder layers (RMSNorm, self-attention, RMSNorm, MLP), decoder
    layers (the same plus RMSNorm and cross-attention); one relative-position bias table
    (buckets x heads) in each stack; two final RMSNorms; the head when untied."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.gated_mlp else 2) * d * f
    attn = counts.attention_params(cfg)
    encoder = cfg.n_layers * (attn + mlp + 2 * d)
    decoder = decoder_layers(cfg) * (2 * attn + mlp + 3 * d)
    bias_tables = 2 * cfg.relative_buckets * cfg.n_heads
    return v * d + encoder + decoder + bias_tables + 2 * d + (0 if cfg.tie_embeddings else d * v)


def _t5_matmul_params(cfg: ml_collections.ConfigDict) -> int:
    mlp = (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_ff
    attn = counts.attention_params(cfg)
    return (cfg.n_layers * (attn + mlp) + decoder_layers(cfg) * (2 * attn + mlp)
            + cfg.d_model * cfg.vocab_size)


T5 = Family(
    name="t5",
    describe="T5 encoder-decoder: RMSNorm, relative position buckets, cross-attention, ReLU "
             "(v1.0) or gated-GELU (v1.1, Flan, mT5) MLP",
    network="jaxlm.model.t5:T5", validate=_t5_validate, param_count=_t5_params,
    matmul_params=_t5_matmul_params,
    lora_targets=ATTENTION_TARGETS,  # the self-attention of either stack's blocks
    kind="encoder_decoder")


FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MOE, GPT2, BERT, T5)}


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
    fam = family(model_cfg.family)
    attention = (fam.attention_flops or counts.attention_flops_per_token)(model_cfg, seq_len)
    return counts.train_flops_per_token(
        fam.matmul_params(model_cfg), model_cfg.d_model * model_cfg.vocab_size, attention,
        lm_head=lm_head, frozen=frozen, adapter_params=adapter_params)


def attention_backend(model_cfg: ml_collections.ConfigDict, platform: str, length: int) -> str:
    """The attention backend that runs for model.attention on `platform` at `length`
    (jaxlm.model.attention.resolve); t5's attention is its own xla code."""
    if family(model_cfg.family).kind == "encoder_decoder":
        return "xla"
    from jaxlm.model import attention  # needs JAX; checking a config does not
    return attention.resolve(model_cfg.attention, platform, length)


def build(model_cfg: ml_collections.ConfigDict, rngs: Any) -> Any:
    """The model of `model_cfg` (an nnx.Module), parameters drawn from `rngs` (nnx.Rngs)."""
    return family(model_cfg.family).network_class()(model_cfg, rngs)


def create(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> Any:
    """An unsharded model (tests, tools); training creates it sharded inside a jit. With
    model.weights quantized, its weights are stored quantized (jaxlm.model.quantized)."""
    from flax import nnx  # the networks need JAX; checking a config does not

    from jaxlm.model import quantized
    with nnx.use_eager_sharding(False):  # shardings are applied by jit, from the rules
        model = build(model_cfg, nnx.Rngs(params=seed))
    if model_cfg.weights != "float":
        quantized.quantize_model(model, model_cfg.weights, model_cfg.weight_group)
    return model


def abstract(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> Any:
    """The model's structure with ShapeDtypeStructs for arrays: nothing allocated."""
    from flax import nnx
    return nnx.eval_shape(lambda: create(model_cfg, seed))
