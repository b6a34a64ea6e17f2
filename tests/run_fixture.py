"""A run directory as `jaxlm train` leaves it (checkpoint with metadata, tokenizer/), written
directly with random parameters, for the generate and eval tests; and what many tests share:
the CLI in a subprocess, a snapshot of a directory's files."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.model import zoo
from jaxlm.parallel import rules

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"


def random_params(params, seed, scale=0.16):
    """Random values for every parameter (only shapes are read): weights large enough that
    attention is far from uniform and greedy outputs vary, non-unit norm scales, nonzero
    biases."""
    rng = np.random.default_rng(seed)

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v)
                continue
            noise = rng.standard_normal(v.shape)
            value = (1.0 + 0.3 * noise if k == "scale" else 0.2 * noise if k.startswith("b")
                     else scale * noise)
            out[k] = jnp.asarray(value, jnp.float32)
        return out

    return walk(params)


def tiny_run_config(data_dir: str, data: dict | None = None, **model):
    cfg = config_lib.load_config_file(CONFIG_DIR / "tiny.py")
    cfg.model.update(dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                          max_seq_len=64, remat="none"))
    cfg.model.update(model)
    cfg.data.update(data_dir=data_dir, seq_len=32, global_batch_size=8)
    cfg.data.update(data or {})
    cfg.metrics.update(tensorboard=False, peak_flops=1e11)
    return config_lib.resolved(cfg, ByteTokenizer.vocab_size, jax.device_count())


def write_run(workdir: pathlib.Path, cfg, seed: int = 0, step: int = 1,
              poisoned: bool = False, edit=None) -> dict:
    """Writes checkpoints/<step> (params, metadata with the config) and tokenizer/ as
    `jaxlm train` leaves them; returns the parameters (nested dict of float32 arrays). The
    shapes come from eval_shape: nothing is initialised eagerly. `poisoned`: the embedding
    holds a NaN (a diverged run). `edit(params)`: changes the random parameters in place
    before they are written."""
    state = nnx.state(zoo.abstract(cfg.model))
    params = random_params(nnx.to_pure_dict(state), seed)
    if edit is not None:
        edit(params)
    if poisoned:
        params["embed"] = params["embed"].at[:, 0].set(jnp.nan)
    ByteTokenizer().save(workdir / "tokenizer")
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint)
    metadata = checkpoint_lib.run_metadata(cfg, rules.axes_of(state), "byte")
    checkpointer.save(step, {"step": jnp.asarray(step, jnp.int32), "params": params}, {}, metadata)
    checkpointer.wait()
    checkpointer.close()
    return params


def jaxlm_cli(*args, cwd=None, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jaxlm.cli ARGS` in a subprocess (what a user types), its output as text."""
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file of a directory tree with its size and modification time: what "nothing
    was written" means."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}
