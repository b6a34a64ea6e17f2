"""Checkpoint layouts met in the wild, without torch: GPT-2 saved from GPT2Model (no
"transformer." prefix, causal-mask buffers), an lm_head stored beside tied embeddings,
float16 weights, and config.json in the layouts of transformers 4 and 5."""

import json

import numpy as np
import pytest

from jaxlm.convert import families, hf_import
from jaxlm.convert import safetensors_io as st


def read(hf_dir):
    ckpt = hf_import.open_checkpoint(hf_dir)
    return ckpt, hf_import.read_params(ckpt)


def test_gpt2_without_prefix_and_with_mask_buffers(tmp_path, hf_models_module):
    cfg = hf_models_module.tiny_cfg("gpt2")
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf", cfg)
    _, expected = read(hf_dir)

    mask = np.tril(np.ones((1, 1, 64, 64), np.float32))

    def gpt2model_layout(name, array):
        out = {name.removeprefix("transformer."): array}
        if name.endswith("ln_1.weight"):  # one causal-mask buffer per layer, as old saves have
            out[name.removeprefix("transformer.").replace("ln_1.weight", "attn.bias")] = mask
        return out
    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE, gpt2model_layout)
    assert "h.0.attn.bias" in st.read_header(hf_dir / st.SINGLE_FILE)
    _, got = read(hf_dir)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_tied_lm_head_copy_is_ignored_and_float16_is_widened(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")  # llama, tied
    _, expected = read(hf_dir)

    def half_with_head(name, array):
        out = {name: array.astype(np.float16)}
        if name == "model.embed_tokens.weight":
            out["lm_head.weight"] = array.astype(np.float16)
        return out
    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE, half_with_head)
    ckpt, got = read(hf_dir)
    assert "lm_head.weight" not in ckpt.plan and "lm_head" not in got
    for name in expected:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], expected[name].astype(np.float16).astype(np.float32))


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
         "vocab_size": 256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("layout", [
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **SCALING}},  # 4.x
    {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **SCALING}},  # older 4.x
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **SCALING}},  # 5.x
])
def test_rope_config_layouts_agree(layout):
    cfg, notes = families.model_config({**LLAMA, **layout})
    assert notes == []
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == 16 and not cfg.tie_embeddings
    assert cfg.rope_scaling.to_dict() == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_len": 8192}
    back = families.hf_config(cfg, "float32", {})
    assert back["rope_scaling"] == {"rope_type": "llama3", **SCALING}
    assert families.model_config(json.loads(json.dumps(back)))[0].to_dict() == cfg.to_dict()


def test_qwen2_sliding_window_only_when_used():
    qwen = {**LLAMA, "model_type": "qwen2", "max_position_embeddings": 32768,
            "sliding_window": 4096}
    cfg, notes = families.model_config({**qwen, "use_sliding_window": False})
    assert cfg.max_seq_len == 32768 and notes == [] and cfg.qkv_bias
    cfg, notes = families.model_config({**qwen, "use_sliding_window": True})
    assert cfg.max_seq_len == 4096 and "sliding_window=4096" in notes[0]


@pytest.mark.parametrize("changes,key", [
    (dict(rope_scaling=dict(type="yarn")), "model.rope_scaling.type"),
    (dict(rope_scaling=dict(type="llama3", low_freq_factor=4.0, high_freq_factor=4.0)),
     "model.rope_scaling.high_freq_factor"),
    (dict(rope_scaling=dict(type="linear", factor=0.0)), "model.rope_scaling.factor"),
    (dict(family="gpt2", n_kv_heads=4, qkv_bias=True), "model.qkv_bias"),
])
def test_new_model_keys_are_validated(changes, key):
    import ml_collections

    from jaxlm import config as config_lib
    from jaxlm.train.validate import validate

    cfg = config_lib.defaults()
    config_lib.merge_overrides(cfg, ml_collections.ConfigDict({"model": changes}))
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, num_devices=1)
