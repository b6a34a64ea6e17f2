"""Every config.json key the mappings read is type- and range-checked (issue 12, item 12):
null where transformers gives null no meaning, a string for a number, a bool, zero or
negative sizes, NaN or Infinity (which Python's json parses) are each one HFConfigError
naming the file and the key; `jaxlm convert from-hf` reports it as one line, exit 2."""

import json
import os

import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm.convert import families, hf_import
from jaxlm.convert.spec import HFConfigError

WHERE = "/models/x/config.json"
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
         "vocab_size": 256, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
        "vocab_size": 128, "layer_norm_epsilon": 1e-5}
MIXTRAL = {**LLAMA, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
QWEN2_MOE = {**LLAMA, "model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}
NAN, INF = float("nan"), float("inf")
LINEAR = {"rope_type": "linear", "factor": 2.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


@pytest.mark.parametrize("base,key,value,named", [
    (LLAMA, "rms_norm_eps", None, "rms_norm_eps is null"),
    (LLAMA, "rms_norm_eps", "1e-5", "rms_norm_eps='1e-5' is not a positive finite number"),
    (LLAMA, "rms_norm_eps", NAN, "rms_norm_eps=nan"),
    (LLAMA, "rms_norm_eps", -1e-5, "rms_norm_eps=-1e-05"),
    (LLAMA, "rms_norm_eps", True, "rms_norm_eps=True"),
    (LLAMA, "hidden_size", "64", "hidden_size='64' is not a positive integer"),
    (LLAMA, "hidden_size", 64.0, "hidden_size=64.0"),
    (LLAMA, "hidden_size", True, "hidden_size=True"),
    (LLAMA, "num_hidden_layers", 0, "num_hidden_layers=0"),
    (LLAMA, "num_attention_heads", -4, "num_attention_heads=-4"),
    (LLAMA, "num_key_value_heads", 0, "num_key_value_heads=0"),
    (LLAMA, "num_key_value_heads", "2", "num_key_value_heads='2'"),
    (LLAMA, "head_dim", -16, "head_dim=-16"),
    (LLAMA, "intermediate_size", 96.5, "intermediate_size=96.5"),
    (LLAMA, "max_position_embeddings", None, "max_position_embeddings is null"),
    (LLAMA, "max_position_embeddings", 0, "max_position_embeddings=0"),
    (LLAMA, "vocab_size", None, "vocab_size is null"),
    (LLAMA, "vocab_size", -1, "vocab_size=-1"),
    (LLAMA, "tie_word_embeddings", "false", "tie_word_embeddings='false' is not true or false"),
    (LLAMA, "tie_word_embeddings", None, "tie_word_embeddings is null"),
    (LLAMA, "attention_bias", "false", "attention_bias='false'"),
    (LLAMA, "mlp_bias", 0, "mlp_bias=0"),
    (LLAMA, "hidden_act", None, "hidden_act is null"),
    (LLAMA, "hidden_act", ["silu"], "hidden_act=['silu'] is not a string"),
    (LLAMA, "rope_theta", INF, "rope_theta=inf"),
    (LLAMA, "rope_theta", 0, "rope_theta=0"),
    (LLAMA, "rope_theta", None, "rope_theta is null"),
    (LLAMA, "rope_scaling", "linear", "rope_scaling='linear' is not an object"),
    (LLAMA, "rope_scaling", {**LINEAR, "factor": None}, "rope_scaling.factor is null"),
    (LLAMA, "rope_scaling", {**LINEAR, "factor": -2.0}, "rope_scaling.factor=-2.0"),
    (LLAMA, "rope_scaling", {**LLAMA3, "low_freq_factor": "1"}, "rope_scaling.low_freq_factor='1'"),
    (LLAMA, "rope_scaling", {**LLAMA3, "original_max_position_embeddings": -8},
     "rope_scaling.original_max_position_embeddings=-8"),
    (LLAMA, "rope_parameters", {"rope_type": "default", "rope_theta": NAN},
     "rope_parameters.rope_theta=nan"),
    (LLAMA, "partial_rotary_factor", "1.0", "partial_rotary_factor='1.0'"),
    ({**LLAMA, "model_type": "mistral"}, "sliding_window", -1, "sliding_window=-1"),
    ({**LLAMA, "model_type": "qwen2"}, "use_sliding_window", "yes", "use_sliding_window='yes'"),
    (MIXTRAL, "num_local_experts", "8", "num_local_experts='8' is not a positive integer"),
    (MIXTRAL, "num_experts_per_tok", None, "num_experts_per_tok is null"),
    (QWEN2_MOE, "num_experts", 0, "num_experts=0"),
    (QWEN2_MOE, "moe_intermediate_size", 32.0, "moe_intermediate_size=32.0"),
    (QWEN2_MOE, "shared_expert_intermediate_size", 0, "shared_expert_intermediate_size=0"),
    (QWEN2_MOE, "norm_topk_prob", "yes", "norm_topk_prob='yes'"),
    (QWEN2_MOE, "qkv_bias", None, "qkv_bias is null"),
    (QWEN2_MOE, "decoder_sparse_step", 2, "decoder_sparse_step=2: layers with a dense MLP"),
    (QWEN2_MOE, "mlp_only_layers", [1], "mlp_only_layers=[1]: layers with a dense MLP"),
    (GPT2, "layer_norm_epsilon", None, "layer_norm_epsilon is null"),
    (GPT2, "layer_norm_epsilon", INF, "layer_norm_epsilon=inf"),
    (GPT2, "n_embd", "32", "n_embd='32'"),
    (GPT2, "n_head", 0, "n_head=0"),
    (GPT2, "n_inner", 0, "n_inner=0"),
    (GPT2, "n_positions", None, "n_positions is null"),
    (GPT2, "tie_word_embeddings", 1, "tie_word_embeddings=1"),
    (GPT2, "scale_attn_weights", None, "scale_attn_weights is null"),
])
def test_bad_values_name_the_file_and_key(base, key, value, named):
    with pytest.raises(HFConfigError) as e:
        families.model_config({**base, key: value}, WHERE)
    message = str(e.value)
    assert message.startswith(f"{WHERE}: ") and named in message, message
    assert "\n" not in message


def test_mixture_keys_are_read():
    """Mixtral: intermediate_size is each expert's width, the top k always renormalised;
    Qwen2-MoE: its expert and shared widths, a gated shared expert, q/k/v biases."""
    cfg, _ = families.model_config(MIXTRAL, WHERE)
    assert (cfg.family, cfg.n_experts, cfg.experts_per_token, cfg.d_ff, cfg.d_expert,
            cfg.d_shared, cfg.router_norm_topk, cfg.qkv_bias) == ("moe", 8, 2, 96, 0, 0, True,
                                                                 False)
    cfg, _ = families.model_config({**QWEN2_MOE, "norm_topk_prob": True}, WHERE)
    assert (cfg.family, cfg.n_experts, cfg.d_expert, cfg.d_shared, cfg.shared_gate,
            cfg.router_norm_topk, cfg.qkv_bias) == ("moe", 8, 32, 64, True, True, True)


def test_a_config_that_is_not_an_object():
    with pytest.raises(HFConfigError, match=f"{WHERE}: not a JSON object"):
        families.model_config([LLAMA], WHERE)


def test_null_means_what_transformers_makes_of_it():
    """Where transformers gives null a meaning, it is the same here (not an error)."""
    cfg, _ = families.model_config({**LLAMA, "num_key_value_heads": None, "head_dim": None,
                                    "rope_scaling": None, "partial_rotary_factor": None}, WHERE)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_scaling.type) == (4, 16, "none")
    cfg, _ = families.model_config({**LLAMA, "model_type": "mistral", "sliding_window": None},
                                   WHERE)
    assert cfg.max_seq_len == 512
    cfg, _ = families.model_config({**GPT2, "n_inner": None}, WHERE)
    assert cfg.d_ff == 128
    # Absent keys keep their documented defaults.
    bare = {k: v for k, v in LLAMA.items() if k not in ("rms_norm_eps", "rope_theta")}
    cfg, _ = families.model_config(bare, WHERE)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings) == (1e-6, 10000.0, False)


@pytest.mark.parametrize("key,value", [("eos_token_id", "2"), ("bos_token_id", True),
                                       ("pad_token_id", -1), ("eos_token_id", [2, None])])
def test_bad_token_ids_name_the_key(tmp_path, hf_models_module, key, value):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    hf_models_module.edit_config(hf_dir, **{key: value})
    with pytest.raises(hf_import.ConversionError) as e:
        hf_import.import_hf(hf_dir, tmp_path / "out", log=lambda _: None)
    assert str(e.value).startswith(f"{hf_dir / 'config.json'}: {key}=")
    assert not (tmp_path / "out").exists()


def test_cli_null_value_is_one_line_and_exit_2(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    hf_models_module.edit_config(hf_dir, rms_norm_eps=None)
    assert json.loads((hf_dir / "config.json").read_text())["rms_norm_eps"] is None
    out = tmp_path / "out"
    proc = run_fixture.jaxlm_cli("convert", "from-hf", hf_dir, "--out", out,
                                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"jaxlm: {hf_dir / 'config.json'}: rms_norm_eps is null; a positive finite number is "
        f"expected"], proc.stderr
    assert not out.exists()
