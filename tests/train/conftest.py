"""A small end-to-end run config on the default corpus, shared by the loop's tests."""

import pathlib

import pytest

from jaxlm import config as config_lib

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "configs"


@pytest.fixture
def run_config(stdlib_data_dir):
    """make(steps, every, seq_len=128, warmup_steps=10): tiny.py shrunk to test size."""
    def make(steps, every, seq_len=128, warmup_steps=10):
        cfg = config_lib.load_config_file(CONFIG_DIR / "tiny.py")
        cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=128)
        cfg.data.update(data_dir=stdlib_data_dir, seq_len=seq_len, global_batch_size=16)
        cfg.optim.update(learning_rate=1e-2, warmup_steps=warmup_steps)
        cfg.train.update(steps=steps, log_every=1)
        cfg.checkpoint.update(every=every, keep=10)
        cfg.metrics.update(peak_flops=1e11, tensorboard=False)
        return cfg
    return make
