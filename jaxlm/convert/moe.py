"""Hugging Face mapping of the moe family: model_type mixtral and qwen2_moe.

Attention, norms, rotary embeddings and the sliding window are the llama family's
(jaxlm/convert/llama.py, `decoder_from_hf`); every layer's MLP is the mixture:

    mixtral    block_sparse_moe.gate (the router, E x D), block_sparse_moe.experts.{j}.w1,
               w3, w2 (expert j's gate, up and down projections; intermediate_size wide),
               the top-k weights always renormalised.
    qwen2_moe  mlp.gate, mlp.experts.{j}.gate_proj, up_proj, down_proj
               (moe_intermediate_size wide), renormalised when norm_topk_prob; the shared
               expert mlp.shared_expert.* (shared_expert_intermediate_size wide) scaled by
               sigmoid(mlp.shared_expert_gate); q/k/v biases when qkv_bias.

These are the per-expert tensors transformers writes (its models hold the experts fused in
memory and split them on save). Every layer must be a mixture: Qwen2-MoE's dense layers
(mlp_only_layers, decoder_sparse_step > 1) are refused with the key named; so is Qwen3-MoE
(model_type qwen3_moe: its q/k norms are not part of jaxlm's attention).

Export writes mixtral for a model without shared experts whose top-k weights are
renormalised and that has no q/k/v biases, and qwen2_moe for a model with a gated shared
expert; any other moe model has no Hugging Face architecture and is refused before anything
is written.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxlm.convert import llama
from jaxlm.convert.spec import HFConfigError, Rule, flag, integer, require
from jaxlm.model import zoo

MODEL_TYPES = ("mixtral", "qwen2_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def config_from_hf(config: dict, cfg: ml_collections.ConfigDict, where: str,
                   notes: list[str]) -> None:
    """Sets the model config's keys from a mixtral or qwen2_moe config.json."""
    llama.decoder_from_hf(config, cfg, where, notes)
    cfg.d_ff = integer(config, "intermediate_size", where)
    cfg.experts_per_token = integer(config, "num_experts_per_tok", where)
    if config["model_type"] == "mixtral":
        cfg.n_experts = integer(config, "num_local_experts", where)
        cfg.router_norm_topk = True  # Mixtral always renormalises the top k
        return
    cfg.n_experts = integer(config, "num_experts", where)
    cfg.d_expert = integer(config, "moe_intermediate_size", where)
    cfg.d_shared = integer(config, "shared_expert_intermediate_size", where)
    cfg.shared_gate = True  # Qwen2-MoE always gates its shared expert
    cfg.router_norm_topk = flag(config, "norm_topk_prob", where, False)
    step = integer(config, "decoder_sparse_step", where, 1)
    require(step == 1, where, "decoder_sparse_step",
            f"={step}: layers with a dense MLP are not supported (every layer a mixture)")
    dense = config.get("mlp_only_layers") or []
    require(dense == [], where, "mlp_only_layers",
            f"={dense!r:.60}: layers with a dense MLP are not supported (every layer a mixture)")


def config_to_hf(m: ml_collections.ConfigDict, base: dict[str, Any]) -> dict[str, Any]:
    """config.json of the architecture that computes the model (the module docstring)."""
    model_type = _model_type(m)
    out = llama.decoder_to_hf(m, base, model_type, ARCHITECTURES[model_type])
    out.update(num_experts_per_tok=m.experts_per_token, output_router_logits=False)
    if model_type == "mixtral":
        out.update(intermediate_size=zoo.expert_width(m), num_local_experts=m.n_experts,
                   router_jitter_noise=0.0, sliding_window=None)
    else:
        out.update(intermediate_size=m.d_ff, moe_intermediate_size=zoo.expert_width(m),
                   shared_expert_intermediate_size=m.d_shared, num_experts=m.n_experts,
                   norm_topk_prob=bool(m.router_norm_topk), decoder_sparse_step=1,
                   mlp_only_layers=[], qkv_bias=bool(m.qkv_bias))
    return out


def _model_type(m: ml_collections.ConfigDict) -> str:
    if m.d_shared:
        if not m.shared_gate:
            raise HFConfigError("a moe model whose shared expert is not gated "
                                "(model.shared_gate=False) has no Hugging Face architecture "
                                "(Qwen2-MoE gates it)")
        return "qwen2_moe"
    if m.qkv_bias or not m.router_norm_topk:
        raise HFConfigError(
            f"a moe model without a shared expert has no Hugging Face architecture unless it "
            f"is Mixtral's: top-k weights renormalised (model.router_norm_topk="
            f"{m.router_norm_topk}) and no q/k/v biases (model.qkv_bias={m.qkv_bias})")
    return "mixtral"


def rules(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[Rule]:
    """Every tensor of the checkpoint: llama's, with each layer's MLP the mixture's."""
    d, e, f = cfg.d_model, cfg.n_experts, zoo.expert_width(cfg)
    if _model_type(cfg) == "mixtral":
        p = "model.layers.{i}.block_sparse_moe."
        names = {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        p = "model.layers.{i}.mlp."
        names = llama.PROJ_NAMES
    mlp = [Rule(p + "gate.weight", (e, d), ("blocks/mlp/router",), transpose=True),
           *llama.swiglu_rules(p + "experts.{j}.", names, d, f, "blocks/mlp/w_", e)]
    if cfg.d_shared:
        mlp += llama.swiglu_rules(p + "shared_expert.", names, d, cfg.d_shared,
                                  "blocks/mlp/shared/w_")
        mlp.append(Rule(p + "shared_expert_gate.weight", (1, d), ("blocks/mlp/shared_gate",),
                        transpose=True))
    return llama.decoder_rules(cfg, mlp)


def ignorable(cfg: ml_collections.ConfigDict, tensor_names: Any = None) -> list[str]:
    return llama.ignorable(cfg, tensor_names)
