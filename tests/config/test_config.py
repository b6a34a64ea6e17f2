"""Every shipped config loads and validates; each bad value gives one error naming its key."""

import pathlib

import pytest

from jaxlm import config as config_lib
from jaxlm.train.validate import validate

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))


def test_configs_directory_is_not_empty():
    assert {p.stem for p in CONFIGS} >= {"tiny", "bench_cpu", "gpt2_124m", "llama_1b", "llama3_8b"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_validates(path):
    cfg = config_lib.load_config_file(path)
    validate(cfg, num_devices=8)
    assert path.read_text().lstrip().startswith('"""'), "each config starts with a docstring"
    doc = path.read_text().split('"""')[1]
    assert "jaxlm " in doc, "the docstring gives the command to run it"


def test_bench_cpu_has_the_shape_the_benchmark_promises():
    m = config_lib.load_config_file(CONFIG_DIR / "bench_cpu.py").model
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.dtype, m.remat) == (
        512, 8, 8, 1408, "float32", "full")


def tiny():
    return config_lib.load_config_file(CONFIG_DIR / "tiny.py")


BAD = [
    # (overrides, devices, text expected in the error)
    ({"mesh.data": 3}, 8, "config.mesh"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, 8, "config.mesh"),
    ({"mesh.tensor": 8, "model.n_heads": 4, "model.n_kv_heads": 4}, 8, "config.model.n_heads"),
    ({"data.global_batch_size": 12}, 8, "config.data.global_batch_size"),
    ({"data.seq_len": 2048}, 1, "config.data.seq_len"),
    ({"model.family": "mamba"}, 1, "config.model.family"),
    ({"model.family": "gpt2", "model.n_kv_heads": 2}, 1, "config.model.n_kv_heads"),  # no GQA
    ({"model.head_dim": 7}, 1, "config.model.head_dim"),  # rotary needs an even head_dim
    ({"mesh.topology": "v9-8"}, 1, "config.mesh.topology"),
    ({"mesh.expert": 2, "mesh.fsdp": 4}, 8, "config.mesh.expert: must be 1 for family 'llama'"),
    ({"model.family": "moe", "model.n_experts": 6, "mesh.expert": 4, "mesh.fsdp": 2}, 8,
     "config.mesh.expert: 4 does not divide model.n_experts=6"),
    ({"model.n_kv_heads": 3}, 1, "config.model.n_kv_heads"),
    ({"model.remat": "some"}, 1, "config.model.remat"),
    ({"optim.grad_accum_steps": 3}, 1, "config.data.global_batch_size"),
    ({"optim.schedule": "linear"}, 1, "config.optim.schedule"),
    ({"train.steps": 0}, 1, "config.train.steps"),
    ({"data.dataset": "c4"}, 1, "config.data.dataset"),
    ({"data.tokenizer": "gpt2"}, 1, "config.data.tokenizer"),
]


@pytest.mark.parametrize("overrides,devices,key", BAD, ids=[k for _, _, k in BAD])
def test_bad_value_names_its_key(overrides, devices, key):
    cfg = tiny()
    for dotted, value in overrides.items():
        config_lib.apply_override(cfg, dotted, str(value))
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, num_devices=devices)


def test_unknown_key_is_rejected_on_override_and_in_files():
    cfg = tiny()
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.stepz"):
        config_lib.apply_override(cfg, "train.stepz", "3")
    with pytest.raises(config_lib.ConfigError, match=r"config\.modle"):
        config_lib.apply_override(cfg, "modle.d_model", "3")
    cfg.train.unlock()
    cfg.train.epochs = 3  # a config file that invents a key
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key: config\.train\.epochs"):
        config_lib.validate(cfg, num_devices=1)


def test_override_values_take_the_type_of_the_default():
    cfg = tiny()
    config_lib.apply_override(cfg, "train.steps", "7")
    config_lib.apply_override(cfg, "optim.learning_rate", "1e-4")
    config_lib.apply_override(cfg, "model.tie_embeddings", "false")
    config_lib.apply_override(cfg, "model.family", "gpt2")
    assert (cfg.train.steps, cfg.optim.learning_rate, cfg.model.tie_embeddings, cfg.model.family) == (
        7, 1e-4, False, "gpt2")
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.steps: expected an integer"):
        config_lib.apply_override(cfg, "train.steps", "many")


def test_mesh_minus_one_takes_the_remaining_devices():
    cfg = tiny()
    cfg.mesh.update(data=2, fsdp=-1, tensor=2)
    assert config_lib.mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2,
                                                 "expert": 1}
    cfg.mesh.update(fsdp=1, context=-1)
    assert config_lib.mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 1, "context": 2, "tensor": 2,
                                                 "expert": 1}


def test_dataset_names_match_the_builders():
    from jaxlm.data import sources
    assert set(config_lib.BUILTIN_DATASETS) == set(sources._BUILDERS)
