"""`jaxlm bench convert`: peak resident memory of a conversion against the model's size.

A random LLaMA-style model of about --size-mb float32 megabytes is written as a sharded
Hugging Face checkpoint (streamed: this process never holds it whole). Then three fresh
Python processes run, one after the other, and each reports its own peak resident set size:
VmHWM in /proc/self/status, the kernel's high-water mark of the process's RSS (getrusage's
ru_maxrss is not used: Linux carries the parent's RSS at fork into a child's ru_maxrss):
    baseline  imports jax, orbax and jaxlm.convert and starts the JAX CPU backend
    import    the same, then `jaxlm convert from-hf`
    export    the same, then `jaxlm convert to-hf` of the imported run
The conversion's own peak is (its process's peak - the baseline's), divided by S, the
model's float32 parameter bytes. Target: below 1.5 for both.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from jaxlm import config as config_lib
from jaxlm.bench.conditions import HostConditions
from jaxlm.bench.table import print_table
from jaxlm.convert import families, spec
from jaxlm.convert import params as params_lib
from jaxlm.convert import safetensors_io as st
from jaxlm.model import zoo

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, orbax.checkpoint
from jaxlm.convert import hf_export, hf_import
jnp.zeros(1).block_until_ready()
action, args = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
if action == "import":
    hf_import.import_hf(args[0], args[1], log=lambda _: None)
elif action == "export":
    hf_export.export_hf(args[0], args[1], log=lambda _: None)
seconds = time.perf_counter() - start
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
print(json.dumps({"peak_bytes": int(status[0]) * 1024, "seconds": seconds}))
"""


def bench_model_config(size_mb: float):
    """LLaMA-style, d_model 1024, GQA 16/8 heads, d_ff 2816, 32000-token tied vocabulary;
    as many layers as bring it to about `size_mb` MB of float32 parameters."""

    cfg = config_lib.defaults().model
    cfg.update(dict(family="llama", d_model=1024, n_heads=16, n_kv_heads=8, head_dim=64,
                    d_ff=2816, vocab_size=32000, max_seq_len=4096, tie_embeddings=True,
                    n_layers=1))
    per_layer = zoo.param_count(_with(cfg, n_layers=2)) - zoo.param_count(cfg)
    target = size_mb * 1e6 / 4
    cfg.n_layers = max(1, round((target - zoo.param_count(cfg) + per_layer) / per_layer))
    return cfg


def _with(cfg, **changes):
    copy = cfg.copy_and_resolve_references()
    copy.update(changes)
    return copy


def write_random_hf(directory: pathlib.Path, model_cfg, shards: int = 3) -> int:
    """A Hugging Face checkpoint of random float32 weights (std 0.02) of any family's model
    config, in about `shards` files, produced tensor by tensor (each layered tensor over its
    own stack's layers: t5's encoder and decoder may differ), with a word-level
    tokenizer.json of min(1000, vocab_size) ids: <s> </s> <unk> and <pad> first, then w4,
    w5, ... The pad id is 0, or position_offset - 1 for a model whose positions start at a
    row offset (RoBERTa reads position p from row pad_token_id + 1 + p). Returns the
    tensor bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    rng = np.random.default_rng(0)
    depths = params_lib.stack_depths(model_cfg)
    plans = []
    for rule in families.rules(model_cfg):
        for layer in spec.layers(rule, depths):
            plans.append(st.TensorPlan(
                rule.name(layer), rule.hf_shape, np.dtype(np.float32),
                lambda s=rule.hf_shape: 0.02 * rng.standard_normal(s, np.float32)))
    total = sum(p.nbytes for p in plans)
    pad = max(model_cfg.position_offset - 1, 0)
    others = iter(("<s>", "</s>", "<unk>"))
    tokens = ["<pad>" if i == pad else next(others, f"w{i}")
              for i in range(min(1000, model_cfg.vocab_size))]
    vocab = {token: i for i, token in enumerate(tokens)}
    config = families.hf_config(model_cfg, "float32", {"pad_id": pad, "bos_id": vocab["<s>"],
                                                       "eos_id": vocab["</s>"]})
    directory.mkdir(parents=True, exist_ok=True)
    st.write_checkpoint(directory, plans, max_shard_bytes=total // shards + 1)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (directory / "tokenizer.json").write_text(tok.to_str())
    return total


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True,
                         env=_child_env())
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_env() -> dict:
    import os
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def bench_convert(size_mb: float = 300.0, directory: str | None = None) -> dict:
    """Prints and returns the figures (see the module docstring)."""

    host = HostConditions()
    cfg = bench_model_config(size_mb)
    model_bytes = 4 * zoo.param_count(cfg)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        scratch = pathlib.Path(scratch)
        start = time.perf_counter()
        write_random_hf(scratch / "hf", cfg)
        print(f"model: llama, {cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
              f"vocab {cfg.vocab_size}: {zoo.param_count(cfg):,} parameters, S = "
              f"{model_bytes / 1e6:,.1f} MB float32 (written as 3 safetensors shards in "
              f"{time.perf_counter() - start:.1f} s)", flush=True)
        base = _run_child("baseline")
        imp = _run_child("import", str(scratch / "hf"), str(scratch / "run"))
        exp = _run_child("export", str(scratch / "run"), str(scratch / "hf_back"))
    figures = {"S_bytes": model_bytes, "baseline_peak_bytes": base["peak_bytes"]}
    print(f"baseline process (python + jax + orbax + jaxlm.convert): peak RSS "
          f"{base['peak_bytes'] / 1e6:,.1f} MB")
    for name, result in (("import (from-hf)", imp), ("export (to-hf)", exp)):
        extra = result["peak_bytes"] - base["peak_bytes"]
        ratio = extra / model_bytes
        key = name.split()[0]
        figures[key] = {"peak_bytes": result["peak_bytes"], "extra_bytes": extra,
                        "ratio": ratio, "seconds": result["seconds"]}
        print(f"{name:<17} peak RSS {result['peak_bytes'] / 1e6:,.1f} MB; minus baseline "
              f"{extra / 1e6:,.1f} MB = {ratio:.2f} x S; {result['seconds']:.1f} s "
              f"({model_bytes / 1e6 / result['seconds']:,.0f} MB/s)")
    for key in ("import", "export"):
        ratio = figures[key]["ratio"]
        print(f"{key} peak {ratio:.2f} x S: {'meets' if ratio < 1.5 else 'MISSES'} the target "
              f"(< 1.5 x S)")
    print_table(host.rows())
    figures.update(host.figures())
    return figures
