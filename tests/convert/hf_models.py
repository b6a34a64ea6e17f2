"""Tiny random Hugging Face models built locally (no hub), and jaxlm forwards to compare.

Reusable by other tests (load this file by path, as tests/model/reference.py is):
    build_hf(case) -> torch model        CASES: name -> (model_type, config overrides)
    save_hf(model, directory)            config.json, safetensors, tokenizer.json
    hf_logits(model, tokens)             float64 NumPy logits
    jaxlm_logits(model_cfg, params, tokens)
    write_hf_dir(directory, model_cfg)   an HF directory without torch (jaxlm's writer)
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxlm import config as config_lib
from jaxlm.convert import families as hf_families
from jaxlm.convert import hf_export
from jaxlm.convert import params as params_lib
from jaxlm.convert import safetensors_io as st

VOCAB = 128
TOKENIZER_VOCAB = 100  # < VOCAB: the model's table may be larger than the tokenizer

BASE = {
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                  max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                 layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0),
}
BASE["mistral"] = dict(BASE["llama"])
BASE["qwen2"] = dict(BASE["llama"])
BASE["mixtral"] = dict(BASE["llama"], num_local_experts=4, num_experts_per_tok=2)
BASE["qwen2_moe"] = dict(BASE["llama"], num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=24)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}

# Grouped-query, multi-query; tied and untied heads; rope theta 100 / 1e4 / 5e5, llama3 and
# linear scaling (llama3 with head_dim 16 and theta 5e5 has wavelengths in all three bands:
# kept, blended and divided); Mistral with a sliding window; Qwen2 biases; GPT-2; Mixtral (4
# experts, top 2, renormalised); Qwen2-MoE (biases, a gated shared expert, top 2 of 4 not
# renormalised).
CASES = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False, rope_theta=10_000.0)),
    "llama_tied_llama3": ("llama", dict(tie_word_embeddings=True, head_dim=16,
                                        max_position_embeddings=1024,
                                        rope_theta=500_000.0, rope_scaling=LLAMA3)),
    "llama_mqa_linear": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False,
                                       rope_theta=100.0,
                                       rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral_window": ("mistral", dict(sliding_window=32, head_dim=8, tie_word_embeddings=False)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "gpt2_tied": ("gpt2", dict()),
    "gpt2_untied": ("gpt2", dict(tie_word_embeddings=False)),
    "mixtral_top2": ("mixtral", dict(tie_word_embeddings=False)),
    "qwen2_moe_shared": ("qwen2_moe", dict(tie_word_embeddings=True, norm_topk_prob=False)),
}


def hf_config(model_type: str, **overrides):
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "gpt2": transformers.GPT2Config,
               "mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig}
    return classes[model_type](**{**BASE[model_type], **overrides})


def randomize(model, seed: int) -> None:
    """Values far from HF's init (norm scales 1, biases 0, std 0.02), so every term and
    every rotary frequency matters: weights std 0.16, scales 1 +- 0.3, biases std 0.2."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.16 * noise)


def build_hf(case: str, seed: int = 0, **overrides):
    """A float32 eval-mode model of CASES[case] with random weights."""
    import transformers

    model_type, kwargs = CASES[case]
    config = hf_config(model_type, **{**kwargs, **overrides})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomize(model, seed)
    return model


def tokenizer_json(vocab_size: int = TOKENIZER_VOCAB, bos_template: bool = False) -> str:
    """A word-level tokenizer.json: <pad> <s> </s> <unk> then w4, w5, ...; `bos_template`:
    Llama's post-processor, which starts every sequence with <s>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>", "<unk>")])
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    return tok.to_str()


GPT2_TEXT = ["the cat sat on the mat.", "hello world, hello there!", "def f(x): return x + 1"]


def gpt2_tokenizer_json() -> tuple[str, int]:
    """(GPT-2-style tokenizer.json, its vocabulary size): byte-level BPE trained on
    GPT2_TEXT, <|endoftext|> id 0 (GPT-2's bos = eos = unk), ByteLevel post-processor (no
    BOS added)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(GPT2_TEXT * 20, trainer=trainer)
    return tok.to_str(), tok.get_vocab_size()


def save_hf(model, directory: pathlib.Path, max_shard_size: str | None = None,
            tokenizer: bool = True) -> pathlib.Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        (directory / "tokenizer.json").write_text(tokenizer_json())
    return directory


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long))
    return out.logits.double().numpy()


def jaxlm_logits(model_cfg, params: dict, tokens: np.ndarray) -> np.ndarray:
    """Logits of jaxlm's Transformer with `params` (nested dict, as checkpoints hold them)."""
    import jax
    from flax import nnx

    from jaxlm.model import zoo

    model_cfg = model_cfg.copy_and_resolve_references()
    model_cfg.remat = "none"
    graphdef, state = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jax.numpy.asarray(a, "float32"), params))
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t),
                  compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(fwd(state, tokens), np.float64)


def random_jaxlm_params(shapes: dict, seed: int) -> dict:
    """Random float32 values for every parameter (flat {path: shape}), scaled as randomize."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        noise = rng.standard_normal(shape)
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "scale":
            value = 1.0 + 0.3 * noise
        elif leaf == "bias" or leaf.startswith("b"):
            value = 0.2 * noise
        else:
            value = 0.16 * noise
        out[name] = value.astype(np.float32)
    return out


# ---- Hugging Face directories written without torch (jaxlm's own writer) ----------------

def tiny_cfg(family="llama", **overrides):
    cfg = config_lib.defaults().model
    cfg.update(dict(family=family, vocab_size=128, d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=2 if family == "llama" else 4, d_ff=48, max_seq_len=64))
    cfg.update(overrides)
    return cfg


def write_hf_dir(directory, model_cfg=None, max_shard_bytes=10**9):
    """A Hugging Face directory (config.json, safetensors, tokenizer.json) of random weights."""
    model_cfg = model_cfg or tiny_cfg()
    shapes, _ = params_lib.abstract_params(model_cfg)
    flat = random_jaxlm_params({k: v.shape for k, v in shapes.items()}, seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    plans = hf_export.tensor_plans(model_cfg, flat.__getitem__, np.dtype("float32"))
    st.write_checkpoint(directory, plans, max_shard_bytes)
    config = hf_families.hf_config(model_cfg, "float32", {"bos_id": 1, "eos_id": 2})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text(tokenizer_json())
    return directory


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path, change):
    """Rewrites one safetensors file with `change(name, array) -> {name: array}`."""
    tensors = st.read_header(path)
    arrays = {}
    for name, info in tensors.items():
        arrays.update(change(name, st.read_tensor(info)))
    plans = [st.TensorPlan(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()]
    st.write_file(path, plans)
