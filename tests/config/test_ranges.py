"""Every numeric config key has a range: NaN, infinities, out-of-range and mistyped values are
one ConfigError line naming the key, and the command line exits 2 on them."""

import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from jaxlm import config as config_lib

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "configs"


def tiny():
    return config_lib.load_config_file(CONFIG_DIR / "tiny.py")


# (override, the one-line error). The values the hardening issue (12, item 8) found accepted.
BAD = [
    ("optim.learning_rate=inf", "config.optim.learning_rate: must be finite and > 0, got inf"),
    ("optim.b1=nan", "config.optim.b1: must be in [0, 1), got nan"),
    ("optim.b1=2", "config.optim.b1: must be in [0, 1), got 2.0"),
    ("optim.b2=-1", "config.optim.b2: must be in [0, 1), got -1.0"),
    ("optim.eps=nan", "config.optim.eps: must be finite and > 0, got nan"),
    ("optim.weight_decay=-0.1", "config.optim.weight_decay: must be finite and >= 0, got -0.1"),
    ("optim.weight_decay=nan", "config.optim.weight_decay: must be finite and >= 0, got nan"),
    ("model.init_std=nan", "config.model.init_std: must be finite and > 0, got nan"),
    ("model.norm_eps=-1", "config.model.norm_eps: must be in (0, 1), got -1.0"),
    ("model.rope_theta=inf", "config.model.rope_theta: must be finite and > 0, got inf"),
    ("model.vocab_size=1000000000",
     "config.model.vocab_size: must be in [0, 16777216], got 1000000000"),
    ("data.global_batch_size=1000000000",
     "config.data.global_batch_size: must be in [1, 65536], got 1000000000"),
    ("data.prefetch=1000000000", "config.data.prefetch: must be in [1, 64], got 1000000000"),
    # and a few more of the same kinds
    ("optim.clip_norm=inf", "config.optim.clip_norm: must be finite and >= 0, got inf"),
    ("optim.min_lr_ratio=nan", "config.optim.min_lr_ratio: must be in [0, 1], got nan"),
    ("checkpoint.every_minutes=inf",
     "config.checkpoint.every_minutes: must be finite and >= 0, got inf"),
    ("train.seed=4294967296", "config.train.seed: must be in [0, 4294967295], got 4294967296"),
    ("data.shuffle_seed=-1", "config.data.shuffle_seed: must be in [0, 2147483647], got -1"),
    ("data.max_document_bytes=0",
     "config.data.max_document_bytes: must be in [1024, 268435456], got 0"),
    ("model.rope_scaling.factor=nan",
     "config.model.rope_scaling.factor: must be finite and > 0, got nan"),
    ("finetune.lora.alpha=inf", "config.finetune.lora.alpha: must be finite and > 0, got inf"),
    ("finetune.lora.dropout=nan", "config.finetune.lora.dropout: must be in [0, 1), got nan"),
    ("train.profile_steps=5", 'config.train.profile_steps: \'5\' is not START:COUNT (e.g. '
                              '"100:5": steps 100 to 104)'),
    ("train.profile_steps=0:3", "config.train.profile_steps: '0:3': START and COUNT must be at "
                                "least 1"),
    ("train.profile_steps=199:3", "config.train.profile_steps: '199:3' ends after "
                                  "train.steps=200"),
    ("train.lm_eval_every=50", "config.train.lm_eval_tasks: name the harness tasks to run "
                               "every train.lm_eval_every=50 steps"),
    ("model.n_experts=4", "config.model.n_experts: only family 'moe' has experts; family "
                          "'llama' has a dense MLP (set 0)"),
    ("model.moe_dispatch=sparse", "config.model.moe_dispatch: 'sparse' not in ('dropless', "
                                  "'capacity', 'dense')"),
]


def test_a_moved_key_names_its_new_name():
    cfg = tiny()
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.apply_override(cfg, "finetune.eval_every", "10")
    assert str(error.value) == ("unknown config key: config.finetune.eval_every (it moved: use "
                                "config.train.eval_every)")
    saved = {"finetune": {"eval_every": 7}, "train": {"steps": 9}}
    config_lib.move_keys(saved)
    assert saved == {"finetune": {}, "train": {"steps": 9, "eval_every": 7}}


@pytest.mark.parametrize("override,message", BAD, ids=[o for o, _ in BAD])
def test_bad_number_is_one_line_naming_its_key(override, message):
    cfg = tiny()
    config_lib.apply_override(cfg, *override.split("="))
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(cfg, num_devices=1)
    assert str(error.value) == message


def test_tokens_per_batch_are_bounded():
    cfg = tiny()
    cfg.model.max_seq_len = cfg.data.seq_len = 2**16
    cfg.data.global_batch_size = 2**14  # each alone is allowed; 2**30 tokens are not ...
    config_lib.validate(cfg, num_devices=1)
    cfg.data.global_batch_size = 2**14 + 1  # ... nor more
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(cfg, num_devices=1)
    assert str(error.value) == (
        "config.data.global_batch_size: 16385 rows of data.seq_len=65536 are 1073807360 "
        "tokens per batch, more than 1073741824")


def numeric_keys(section, prefix=""):
    """(dotted key, default) of every int or float leaf, bools excluded."""
    for key, value in section.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from numeric_keys(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


NUMERIC = sorted(numeric_keys(config_lib.defaults()))


def test_the_schema_has_the_numeric_keys_this_test_walks():
    keys = {k for k, _ in NUMERIC}
    assert {"optim.b1", "data.prefetch", "model.vocab_size", "finetune.lora.rank",
            "model.rope_scaling.factor", "data.max_document_bytes"} <= keys
    assert len(keys) >= 45


@pytest.mark.parametrize("key,default", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_key_has_a_range(key, default):
    """NaN and both infinities for a float key; a negative and an absurd value for an integer
    key (a mesh axis: its size is checked against the device count, naming config.mesh)."""
    bad = [math.nan, math.inf, -math.inf] if isinstance(default, float) else [-5, 10**18]
    for value in bad:
        cfg = tiny()
        *sections, leaf = key.split(".")
        node = cfg
        for name in sections:
            node = node[name]
        node[leaf] = value
        with pytest.raises(config_lib.ConfigError) as error:
            config_lib.validate(cfg, num_devices=1)
        named = "config.mesh" if key.startswith("mesh.") and value > 0 else f"config.{key}"
        assert str(error.value).startswith(named), (value, str(error.value))
        assert "\n" not in str(error.value)


def test_command_line_exits_2_with_the_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "train", "--workdir", str(tmp_path / "run"),
         "--config.optim.b1=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["jaxlm: config.optim.b1: must be in [0, 1), got 2.0"]
    assert not (tmp_path / "run").exists()
