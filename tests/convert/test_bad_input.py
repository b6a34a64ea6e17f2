"""Bad input to the conversions: one clear error naming the file, key or tensor, raised
before any weight is read or any output is written. Needs no torch: the HF directories are
written with jaxlm's own safetensors writer."""

import numpy as np
import pytest

from jaxlm import cli
from jaxlm.convert import hf_import
from jaxlm.convert import safetensors_io as st


def expect_error(hf_dir, out, *fragments):
    with pytest.raises(hf_import.ConversionError) as e:
        hf_import.import_hf(hf_dir, out, log=lambda _: None)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    assert not out.exists()  # nothing written before the check
    return str(e.value)


def test_unsupported_architecture(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    hf_models_module.edit_config(hf_dir, model_type="phi3", architectures=["Phi3ForCausalLM"])
    expect_error(hf_dir, tmp_path / "out", "unsupported architecture", "'phi3'", "config.json")


@pytest.mark.parametrize("key,value,fragment", [
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn'"),
    ("attention_bias", True, "attention_bias"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("head_dim", 7, "model.head_dim"),  # rotary embeddings need an even head_dim
])
def test_unsupported_config_values_name_the_key(tmp_path, hf_models_module, key, value, fragment):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    hf_models_module.edit_config(hf_dir, **{key: value})
    expect_error(hf_dir, tmp_path / "out", fragment)


def test_missing_shard(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf", max_shard_bytes=20_000)
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    expect_error(hf_dir, tmp_path / "out", "missing shard", shards[1].name, st.INDEX_FILE)


def test_shape_mismatch_names_the_tensor(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    hf_models_module.edit_config(hf_dir, intermediate_size=40)
    expect_error(hf_dir, tmp_path / "out", "'model.layers.0.mlp.gate_proj.weight'",
                 "shape (48, 32)", "(40, 32)")


def test_dtype_mismatch_names_the_tensor(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    bad = "model.layers.1.self_attn.k_proj.weight"
    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE,
                                     lambda n, a: {n: a.astype(np.int32) if n == bad else a})
    expect_error(hf_dir, tmp_path / "out", repr(bad), "dtype I32")


def test_missing_and_unexpected_tensors(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    gone = "model.layers.1.mlp.up_proj.weight"
    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE, lambda n, a: {} if n == gone else {n: a})
    expect_error(hf_dir, tmp_path / "out", repr(gone), "missing")

    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf2")
    extra = "model.layers.2.mlp.up_proj.weight"  # a third layer config.json does not have
    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE,
                                     lambda n, a: {n: a, **({extra: a} if n == gone else {})})
    expect_error(hf_dir, tmp_path / "out", repr(extra), "not part of the model", "2 layers")


def test_pickle_weights_are_refused(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    (hf_dir / st.SINGLE_FILE).unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    expect_error(hf_dir, tmp_path / "out", "pytorch_model.bin", "pickle", "safetensors")


def test_truncated_file_and_missing_pieces(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    data = (hf_dir / st.SINGLE_FILE).read_bytes()
    (hf_dir / st.SINGLE_FILE).write_bytes(data[:-100])
    expect_error(hf_dir, tmp_path / "out", "outside the file", st.SINGLE_FILE)

    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf2")
    (hf_dir / "tokenizer.json").unlink()
    expect_error(hf_dir, tmp_path / "out", "no tokenizer", "tokenizer.json")
    (hf_dir / "config.json").unlink()
    expect_error(hf_dir, tmp_path / "out", "config.json", "does not exist")
    expect_error(tmp_path / "nowhere", tmp_path / "out", "no such directory")


def test_output_that_holds_a_run_is_refused(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    with pytest.raises(hf_import.ConversionError, match="already holds a run"):
        hf_import.import_hf(hf_dir, tmp_path / "out", log=lambda _: None)


def test_cli_reports_bad_input_with_status_2(tmp_path, hf_models_module, capsys):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    hf_models_module.edit_config(hf_dir, model_type="mamba")
    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
    assert "model_type='mamba'" in capsys.readouterr().err
    assert cli.main(["convert", "to-hf", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "hf_out")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["convert", "to-hf", str(tmp_path), "--out", str(tmp_path / "x"),
                     "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err


def write_run(directory, hf_models_module, extra=None, model_cfg=None):
    """A jaxlm run of random parameters of `model_cfg` (tiny llama) plus `extra` ones."""
    from jaxlm.convert import params as params_lib

    model_cfg = model_cfg or hf_models_module.tiny_cfg()
    shapes, axes = params_lib.abstract_params(model_cfg)
    flat = hf_models_module.random_jaxlm_params({k: v.shape for k, v in shapes.items()}, seed=1)
    flat.update(extra or {})
    directory.mkdir(parents=True)
    cfg = params_lib.run_config(model_cfg, directory, "byte")
    return params_lib.write_checkpoint(directory, cfg, flat, axes, "byte")


def test_export_refuses_parameters_it_would_drop(tmp_path, hf_models_module):
    from jaxlm.convert import hf_export

    write_run(tmp_path / "run", hf_models_module,
              extra={"blocks/attn/lora_wq/a": np.zeros((2, 32, 4), np.float32)})
    with pytest.raises(hf_import.ConversionError, match="'blocks/attn/lora_wq/a'.*lora merge"):
        hf_export.export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _: None)
    assert not (tmp_path / "hf").exists()


def test_export_detects_damaged_parameters(tmp_path, hf_models_module):
    import json

    from jaxlm.convert import hf_export

    step_dir = write_run(tmp_path / "run", hf_models_module)
    sums_file = step_dir / "checksums" / "metadata"
    sums = json.loads(sums_file.read_text())
    sums["params/blocks/mlp/w_up"] ^= 1  # as if the array's bytes had changed
    sums_file.write_text(json.dumps(sums))
    with pytest.raises(hf_import.ConversionError, match="'blocks/mlp/w_up'.*fingerprint"):
        hf_export.export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _: None)


@pytest.mark.parametrize("overrides,fragment", [
    (dict(router_norm_topk=False), "model.router_norm_topk=False"),
    (dict(router_norm_topk=True, qkv_bias=True), "model.qkv_bias=True"),
    (dict(d_shared=24, shared_gate=False), "model.shared_gate=False"),
])
def test_export_refuses_a_moe_model_no_architecture_computes(overrides, fragment, tmp_path,
                                                              hf_models_module):
    """Mixtral renormalises its top-k weights and has no biases; Qwen2-MoE gates its shared
    expert: a moe model that is neither is refused before anything is written."""
    from jaxlm.convert import hf_export

    model_cfg = hf_models_module.tiny_cfg("moe", n_experts=4, experts_per_token=2, **overrides)
    write_run(tmp_path / "run", hf_models_module, model_cfg=model_cfg)
    with pytest.raises(hf_import.ConversionError, match="no Hugging Face architecture") as e:
        hf_export.export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _: None)
    assert fragment in str(e.value)
    assert not (tmp_path / "hf").exists()
