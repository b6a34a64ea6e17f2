"""`jaxlm bench lora`: a LoRA fine-tuning step against a full fine-tuning step on one shape,
and the size of what each checkpoints.

    jaxlm bench lora --config configs/bench_cpu.py [--steps 2] [--rounds 5]

Both steps are the real fine-tuning steps (`finetune.step`, same state layout, sharding, jit
and donation as `jaxlm finetune`) on the same synthetic SFT batch (loss on the second half
of every row), from the same random base. The shape is the config's; LoRA uses the config's
finetune.lora keys (default rank 8, alpha 16, targets q,k,v,o,mlp; dropout is set to 0 so
both steps run the same model). On a shared machine timings drift, so the two steps
alternate: `rounds` rounds of `steps` steps each, the order swapped every round, and the
medians of the per-step times are compared. Checkpoint sizes are the bytes of the state each
method saves (LoRA: adapters and their Adam moments; full: every parameter and its moments),
and the files of one real save of each.
"""

from __future__ import annotations

import tempfile
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.bench import print_table
from jaxlm.checkpoint_tools import disk_bytes, format_bytes
from jaxlm.data import tokenizers
from jaxlm.finetune import state as state_lib, step as step_lib
from jaxlm.model import transformer
from jaxlm.train import optimizer as optimizer_lib


def synthetic_sft_batch(global_batch: int, seq_len: int, vocab: int, mesh, seed: int = 0) -> dict:
    """Random tokens, one example per row, loss on the second half (the "response")."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(global_batch, seq_len + 1), dtype=np.int32)
    weights = np.zeros((global_batch, seq_len), np.float32)
    weights[:, seq_len // 2:] = 1.0
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((global_batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                         (global_batch, seq_len)),
            "weights": weights}
    return {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host.items()}


class _Method:
    """One method's compiled step, state and frozen inputs."""

    def __init__(self, cfg: ml_collections.ConfigDict, method: str, mesh, make_base):
        ft = ml_collections.ConfigDict(cfg.finetune.to_dict())
        ft.update(task="sft", method=method)
        ft.lora.dropout = 0.0
        self.name = method
        tx = optimizer_lib.make_optimizer(cfg.optim, cfg.train.steps)
        schedule = optimizer_lib.learning_rate_schedule(cfg.optim, cfg.train.steps)
        self.fs = fs = state_lib.spec(cfg.model, ft, tx, mesh, cfg.train.seed)
        start = time.perf_counter()
        step = step_lib.jit_train_step(step_lib.make_train_step(
            fs, ft, cfg.optim, tx, schedule, cfg.train.seed), fs, "sft", mesh)
        self.compiled = step.lower(fs.abstract, fs.frozen_abstract, step_lib.abstract_batch(
            "sft", cfg.data.global_batch_size, cfg.data.seq_len, mesh)).compile()
        self.compile_s = time.perf_counter() - start
        base = make_base(fs)
        self.frozen = {"params": base} if method == "lora" else {}
        self.state = state_lib.init_state(cfg.model, ft, tx, fs, base, cfg.train.seed)
        self.trainable = sum(int(np.prod(x.shape)) for g in fs.groups
                             for x in jax.tree.leaves(fs.abstract[g]))
        self.state_bytes = checkpoint_lib.state_nbytes(fs.abstract)
        self.times: list[float] = []
        self.last_loss = float("nan")

    def run(self, batch, steps: int, record: bool = True) -> dict:
        for _ in range(steps):
            start = time.perf_counter()
            self.state, out = self.compiled(self.state, self.frozen, batch)
            jax.block_until_ready(out)
            if record:
                self.times.append(time.perf_counter() - start)
        self.last_loss = float(out["loss"])

    def checkpoint_bytes(self, directory: str) -> int:
        ckpt_cfg = ml_collections.ConfigDict(dict(every=0, every_minutes=0.0, keep=1,
                                                  keep_period=0, init_from=""))
        checkpointer = checkpoint_lib.Checkpointer(f"{directory}/{self.name}", ckpt_cfg)
        checkpointer.save(1, self.state, {}, {})
        checkpointer.wait()
        checkpointer.close()
        return disk_bytes(checkpointer.directory / "1")


def bench_lora(cfg: ml_collections.ConfigDict, steps: int = 2, rounds: int = 5) -> dict[str, float]:
    config_lib.validate(cfg, jax.device_count())
    cfg = config_lib.resolved(cfg, tokenizers.load_tokenizer(cfg.data).vocab_size,
                              jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    m = cfg.model

    def make_base(fs: state_lib.FinetuneSpec):  # the same random base for both, sharded
        def build():
            return nnx.to_pure_dict(nnx.state(transformer.create(m, cfg.train.seed)))
        return jax.jit(build, out_shardings=jax.tree.map(lambda a: a.sharding, fs.base_abstract))()

    with jax.set_mesh(mesh), sharding.axis_rules():
        methods = [_Method(cfg, "lora", mesh, make_base), _Method(cfg, "full", mesh, make_base)]
        lora_m, full_m = methods
        batch = synthetic_sft_batch(cfg.data.global_batch_size, cfg.data.seq_len, m.vocab_size,
                                    mesh)
        for method in methods:  # one untimed warm step each
            method.run(batch, 1, record=False)
        for r in range(rounds):
            for method in (methods if r % 2 == 0 else methods[::-1]):
                method.run(batch, steps)
    with tempfile.TemporaryDirectory(prefix="jaxlm_bench_lora_") as tmp:
        disk = {method.name: method.checkpoint_bytes(tmp) for method in methods}

    full_s, lora_s = float(np.median(full_m.times)), float(np.median(lora_m.times))
    figures = {
        "full_step_s": full_s, "lora_step_s": lora_s, "step_ratio": lora_s / full_s,
        "full_state_bytes": float(full_m.state_bytes),
        "lora_state_bytes": float(lora_m.state_bytes),
        "state_ratio": lora_m.state_bytes / full_m.state_bytes,
        "full_checkpoint_disk_bytes": float(disk["full"]),
        "lora_checkpoint_disk_bytes": float(disk["lora"]),
        "lora_trainable": float(lora_m.trainable), "full_trainable": float(full_m.trainable),
    }
    lora_cfg = cfg.finetune.lora
    print_table([
        ("config", f"{m.family} d={m.d_model} L={m.n_layers} seq={cfg.data.seq_len} "
                   f"batch={cfg.data.global_batch_size} {m.dtype} remat={m.remat}"),
        ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
                    f"mesh {dict(mesh.shape)}"),
        ("LoRA", f"rank {lora_cfg.rank}, alpha {lora_cfg.alpha}, targets {lora_cfg.targets}"),
        ("trainable parameters", f"full {full_m.trainable:,} / LoRA {lora_m.trainable:,} "
                                 f"({100 * lora_m.trainable / full_m.trainable:.2f}%)"),
        ("compile", f"full {full_m.compile_s:.1f} s / LoRA {lora_m.compile_s:.1f} s"),
        (f"step time (median of {rounds}x{steps}, alternating)",
         f"full {full_s * 1e3:.0f} ms / LoRA {lora_s * 1e3:.0f} ms"),
        ("LoRA step / full step", f"{lora_s / full_s:.3f}x (target <= 0.8x)"),
        ("checkpointed state", f"full {format_bytes(full_m.state_bytes)} / LoRA "
                               f"{format_bytes(lora_m.state_bytes)}"),
        ("LoRA / full state", f"{100 * figures['state_ratio']:.2f}% (target < 5%)"),
        ("checkpoint on disk", f"full {format_bytes(disk['full'])} / LoRA "
                               f"{format_bytes(disk['lora'])} "
                               f"({100 * disk['lora'] / disk['full']:.2f}%)"),
        ("last loss", f"full {full_m.last_loss:.4f} / LoRA {lora_m.last_loss:.4f}"),
    ])
    return figures
