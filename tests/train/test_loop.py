"""End to end on the default corpus: the loss falls, and a resumed run equals an
uninterrupted one step for step."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.train import loop

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "configs"


def small_run_config(data_dir, steps, every):
    cfg = config_lib.load_config_file(CONFIG_DIR / "tiny.py")
    cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=128)
    cfg.data.update(data_dir=data_dir, seq_len=128, global_batch_size=16)
    cfg.optim.update(learning_rate=1e-2, warmup_steps=10)
    cfg.train.update(steps=steps, log_every=1)
    cfg.checkpoint.update(every=every, keep=10)
    cfg.metrics.update(peak_flops=1e11, tensorboard=False)
    return cfg


@pytest.mark.slow
def test_loss_drops_on_the_default_corpus(stdlib_data_dir, tmp_path):
    logged = loop.train(small_run_config(stdlib_data_dir, steps=80, every=0), tmp_path)
    losses = np.array([m["loss"] for m in logged])
    assert len(losses) == 80
    # Uniform guessing over 384 ids costs ln(384) = 5.95 nats; bytes of Python source are far
    # more predictable than that, and a working trainer finds out within 80 steps. (Single
    # steps are noisy: a batch holds few files, some much easier than others.)
    assert losses[0] > 5.0
    assert losses[-10:].mean() < 3.5, losses[-10:]


def test_resumed_run_equals_uninterrupted_run(stdlib_data_dir, tmp_path):
    full_dir = tmp_path / "full"
    full = loop.train(small_run_config(stdlib_data_dir, steps=6, every=2), full_dir)

    # The same run "interrupted" after step 4: its workdir without the later checkpoint.
    cut_dir = tmp_path / "cut"
    shutil.copytree(full_dir, cut_dir)
    shutil.rmtree(cut_dir / "checkpoints" / "6")
    resumed = loop.train(small_run_config(stdlib_data_dir, steps=6, every=2), cut_dir)

    assert [m["step"] for m in resumed] == [5, 6]
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [m[key] for m in resumed] == [m[key] for m in full[4:]], key  # bit for bit
    lines = [json.loads(line) for line in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6, 5, 6]
