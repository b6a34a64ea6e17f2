"""Which Hugging Face tensor holds which jaxlm parameter, per family, in both directions.

A `Rule` ties one HF tensor (per layer when its name has `{i}`) to one or more jaxlm
parameters. Import: the HF array, transposed when `transpose` (torch Linear weights are
stored out x in; jaxlm's are in x out), is split into equal parts along its last axis (GPT-2's
fused q|k|v) and each part is copied into its parameter, reshaped in C order (the HF column
index h*K + k is jaxlm's (h, k)). Export does the reverse.

Conventions checked against transformers (the parity tests prove them): LLaMA, Mistral and
Qwen2 store q/k projections already in the half-split ("rotate_half") rotary layout that
jaxlm uses, so no permutation is needed; RMSNorm scales multiply after normalising in
float32 as jaxlm does; GPT-2's Conv1D weights are in x out (no transpose).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxlm import config as config_lib


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


def rules(model_cfg: ml_collections.ConfigDict, gpt2_prefix: str = "transformer.") -> list[Rule]:
    """Every tensor of the HF checkpoint of `model_cfg`, in the order HF writes them."""
    if model_cfg.family == "gpt2":
        return _gpt2_rules(model_cfg, gpt2_prefix)
    return _llama_rules(model_cfg)


def ignorable(model_cfg: ml_collections.ConfigDict, gpt2_prefix: str = "transformer.") -> list[str]:
    """Tensors a checkpoint may hold that carry no parameter: cached rotary tables, GPT-2's
    causal-mask buffers, and an lm_head saved beside tied embeddings (HF ties it anyway)."""
    names = []
    if model_cfg.family == "gpt2":
        names += [f"{gpt2_prefix}h.{{i}}.attn.bias", f"{gpt2_prefix}h.{{i}}.attn.masked_bias"]
    else:
        names += ["model.layers.{i}.self_attn.rotary_emb.inv_freq"]
    if model_cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def _dims(cfg: ml_collections.ConfigDict):
    return (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, config_lib.head_dim(cfg), cfg.d_ff,
            cfg.vocab_size)


def _llama_rules(cfg: ml_collections.ConfigDict) -> list[Rule]:
    d, h, g, k, f, v = _dims(cfg)
    p = "model.layers.{i}."
    out = [Rule("model.embed_tokens.weight", (v, d), ("embed",))]
    out += [
        Rule(p + "input_layernorm.weight", (d,), ("blocks/attn_norm/scale",)),
        Rule(p + "self_attn.q_proj.weight", (h * k, d), ("blocks/attn/wq",), transpose=True),
        Rule(p + "self_attn.k_proj.weight", (g * k, d), ("blocks/attn/wk",), transpose=True),
        Rule(p + "self_attn.v_proj.weight", (g * k, d), ("blocks/attn/wv",), transpose=True),
        Rule(p + "self_attn.o_proj.weight", (d, h * k), ("blocks/attn/wo",), transpose=True),
    ]
    if cfg.qkv_bias:
        out += [Rule(p + "self_attn.q_proj.bias", (h * k,), ("blocks/attn/bq",)),
                Rule(p + "self_attn.k_proj.bias", (g * k,), ("blocks/attn/bk",)),
                Rule(p + "self_attn.v_proj.bias", (g * k,), ("blocks/attn/bv",))]
    out += [
        Rule(p + "post_attention_layernorm.weight", (d,), ("blocks/mlp_norm/scale",)),
        Rule(p + "mlp.gate_proj.weight", (f, d), ("blocks/mlp/w_gate",), transpose=True),
        Rule(p + "mlp.up_proj.weight", (f, d), ("blocks/mlp/w_up",), transpose=True),
        Rule(p + "mlp.down_proj.weight", (d, f), ("blocks/mlp/w_down",), transpose=True),
        Rule("model.norm.weight", (d,), ("final_norm/scale",)),
    ]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", (v, d), ("lm_head",), transpose=True))
    return out


def _gpt2_rules(cfg: ml_collections.ConfigDict, prefix: str) -> list[Rule]:
    d, h, g, k, f, v = _dims(cfg)
    p = prefix + "h.{i}."
    out = [
        Rule(prefix + "wte.weight", (v, d), ("embed",)),
        Rule(prefix + "wpe.weight", (cfg.max_seq_len, d), ("pos_embed",)),
        Rule(p + "ln_1.weight", (d,), ("blocks/attn_norm/scale",)),
        Rule(p + "ln_1.bias", (d,), ("blocks/attn_norm/bias",)),
        # Conv1D: in x out, q|k|v concatenated along out.
        Rule(p + "attn.c_attn.weight", (d, 3 * h * k),
             ("blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv")),
        Rule(p + "attn.c_attn.bias", (3 * h * k,),
             ("blocks/attn/bq", "blocks/attn/bk", "blocks/attn/bv")),
        Rule(p + "attn.c_proj.weight", (h * k, d), ("blocks/attn/wo",)),
        Rule(p + "attn.c_proj.bias", (d,), ("blocks/attn/bo",)),
        Rule(p + "ln_2.weight", (d,), ("blocks/mlp_norm/scale",)),
        Rule(p + "ln_2.bias", (d,), ("blocks/mlp_norm/bias",)),
        Rule(p + "mlp.c_fc.weight", (d, f), ("blocks/mlp/w_in",)),
        Rule(p + "mlp.c_fc.bias", (f,), ("blocks/mlp/b_in",)),
        Rule(p + "mlp.c_proj.weight", (f, d), ("blocks/mlp/w_out",)),
        Rule(p + "mlp.c_proj.bias", (d,), ("blocks/mlp/b_out",)),
        Rule(prefix + "ln_f.weight", (d,), ("final_norm/scale",)),
        Rule(prefix + "ln_f.bias", (d,), ("final_norm/bias",)),
    ]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", (v, d), ("lm_head",), transpose=True))
    return out


def expand(rule_list: list[Rule], n_layers: int) -> dict[str, tuple[Rule, int | None]]:
    """HF tensor name -> (rule, layer index or None), every layer spelled out."""
    named: dict[str, tuple[Rule, int | None]] = {}
    for rule in rule_list:
        if rule.layered:
            named.update({rule.hf.format(i=i): (rule, i) for i in range(n_layers)})
        else:
            named[rule.hf] = (rule, None)
    return named
