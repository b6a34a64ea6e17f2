"""The config.py that `convert from-hf` writes is fixed code holding no string of the user's;
the run's values (model, tokenizer path, where the parameters are) are data in
config_values.json beside it. A directory name that would be code inside Python source (issue
12, item 3) is a plain string there: loading the config runs nothing and gives back exactly
the intended values."""

import pytest

from jaxlm import config as config_lib
from jaxlm.convert import hf_import
from jaxlm.convert import params as params_lib

INJECTION = 'm"""; __import__("os").system("touch PWNED"); """'
# Quotes of every kind, backslashes (escapes Python would read inside a string), newlines.
QUOTES = "q'''\"\"\"\\N{x}\\x\\\\ \\\';\n__import__('os').system('touch PWNED')\n#\r\tend"


def expected_values(out):
    """The config the converted run should have, written out independently: the tiny model
    of hf_models.tiny_cfg (its config.json), the tokenizer and parameters under `out`."""
    return {"model": {"family": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4,
                      "n_kv_heads": 2, "d_ff": 48, "vocab_size": 128, "max_seq_len": 64,
                      "tie_embeddings": True, "dtype": "float32", "head_dim": 8,
                      "qkv_bias": False, "norm_eps": 1e-5, "rope_theta": 10_000.0},
            "data": {"tokenizer": "hf", "tokenizer_path": str(out / "tokenizer"),
                     "seq_len": 64},  # min(the default 256, max_position_embeddings)
            "checkpoint": {"init_from": str(out)}}


def assert_values(cfg, expected):
    for section, values in expected.items():
        for key, value in values.items():
            assert cfg[section][key] == value, f"{section}.{key}"


@pytest.mark.parametrize("name", [INJECTION, QUOTES], ids=["triple-quote", "quotes-newlines"])
def test_hostile_paths_load_as_plain_data(tmp_path, monkeypatch, hf_models_module, name):
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would create its file
    hf_dir = hf_models_module.write_hf_dir(tmp_path / name)
    # TensorStore cannot write under a backslash (tested below): the run directory gets the
    # name without them; the source directory (recorded too) keeps them.
    out = tmp_path / "runs" / name.replace("\\", "")
    hf_import.import_hf(hf_dir, out, log=lambda _: None)

    text = (out / "config.py").read_text()
    assert text == params_lib.CONFIG_TEXT and "PWNED" not in text  # the same for any run
    cfg = config_lib.load_config_file(out / "config.py")
    assert not list(tmp_path.rglob("PWNED"))
    assert_values(cfg, expected_values(out))
    # ... and every other key as the importer's own run config has it.
    ckpt = hf_import.open_checkpoint(hf_dir)
    assert cfg.to_dict() == params_lib.run_config(ckpt.model_cfg, out, "hf").to_dict()


def test_config_file_holds_no_path_even_with_backslashes(tmp_path, monkeypatch, hf_models_module):
    """write_config_file alone, for a directory name with backslashes (no checkpoint)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / (INJECTION + QUOTES)
    out.mkdir()
    model_cfg = hf_models_module.tiny_cfg()
    model_cfg.update(dtype="float32", head_dim=8)  # as the importer sets them
    cfg = params_lib.run_config(model_cfg, out, "hf")
    params_lib.write_config_file(out, cfg)
    assert (out / "config.py").read_text() == params_lib.CONFIG_TEXT
    loaded = config_lib.load_config_file(out / "config.py")
    assert not list(tmp_path.rglob("PWNED"))
    assert_values(loaded, expected_values(out))
    assert loaded.to_dict() == cfg.to_dict()


def test_out_path_with_a_backslash_is_refused_before_reading(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    out = tmp_path / "a\\b"
    with pytest.raises(hf_import.ConversionError, match="backslash"):
        hf_import.import_hf(hf_dir, out, log=lambda _: None)
    assert not out.exists() and not (tmp_path / "a").exists()


def test_config_without_its_values_is_a_config_error(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    hf_import.import_hf(hf_dir, tmp_path / "run", log=lambda _: None)
    (tmp_path / "run" / params_lib.VALUES_FILE).write_text("[1, 2]")
    with pytest.raises(config_lib.ConfigError, match="config_values.json: not a JSON object"):
        config_lib.load_config_file(tmp_path / "run" / "config.py")
    (tmp_path / "run" / params_lib.VALUES_FILE).unlink()
    with pytest.raises(config_lib.ConfigError, match="config_values.json"):
        config_lib.load_config_file(tmp_path / "run" / "config.py")
