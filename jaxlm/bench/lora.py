"""`jaxlm bench lora`: a LoRA fine-tuning step against a full fine-tuning step and a QLoRA
step on one shape, the memory each step holds, and the size of what each checkpoints.

    jaxlm bench lora --config configs/bench_cpu.py [--steps 2] [--rounds 5]

The steps are the real fine-tuning steps (the SFT task of `jaxlm finetune`: same state
layout, sharding, jit and donation) on the same synthetic SFT batch (loss on the second
half of every row), from the same random base, written as a run directory first. The
shape is the config's; LoRA uses the config's finetune.lora keys (default rank 8, alpha
16, targets q,k,v,o,mlp; dropout is set to 0 so the steps run the same model); QLoRA is
LoRA on the base held as nf4 codes (finetune.base_quant, groups of 64). On a shared
machine timings drift, so the steps alternate: `rounds` rounds of `steps` steps each, the
order swapped every round, and the medians of the per-step times are compared (printed
with their min and max, and the per-round ratio). Step memory is XLA's memory analysis of
each compiled step on one device (what it holds at its peak: state, frozen base, batch,
temporaries). Checkpoint sizes are the bytes of the state each method saves (LoRA:
adapters and their Adam moments; full: every parameter and its moments), and the files of
one real save of each.
"""

from __future__ import annotations

import pathlib
import tempfile
import time

import jax
import ml_collections
import numpy as np

from jaxlm.bench.conditions import HostConditions, interleaved, median_min_max, spread
from jaxlm.bench.step import BenchRun, synthetic_batch
from jaxlm.bench.table import print_table
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint.inspect import disk_bytes, format_bytes
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import aot
from jaxlm.train.lm import CausalLM


def write_random_base(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """A run directory holding step 1 of `cfg`'s model with fresh random parameters, as
    `jaxlm train` writes one."""
    task = CausalLM(cfg)
    mesh = mesh_lib.make_mesh(task.cfg.mesh)
    with mesh_lib.use(mesh):
        task.build(mesh)
        state = task.init_state()
    task.tokenizer.save(workdir / "tokenizer")
    checkpointer = checkpoint_lib.Checkpointer(workdir, task.cfg.checkpoint)
    try:
        checkpointer.save(1, {"step": state["step"], "params": state["params"]}, {},
                          task.metadata())
        checkpointer.wait()
    finally:
        checkpointer.close()


class _Method:
    """One method's task, compiled step and state."""

    def __init__(self, cfg: ml_collections.ConfigDict, method: str, base: pathlib.Path,
                 base_quant: str = "none"):
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.finetune.update(task="sft", method=method, base=str(base), train_file="unused",
                            base_quant=base_quant)
        cfg.finetune.lora.dropout = 0.0  # the steps run the same model
        self.name = "qlora" if base_quant != "none" else method
        task = FinetuneTask(cfg)
        self.run = BenchRun(task)
        self.run.batch = synthetic_batch(task, prompt_fraction=0.5)
        self.trainable = task.spec.trainable_count
        self.state_bytes = checkpoint_lib.state_nbytes(task.spec.abstract)
        self.compile_s = self.run.compile_s
        self.memory = aot.memory_of(self.run.compiled).total  # one device's step, at its peak
        self.times: list[float] = []
        self.last_loss = float("nan")

    def steps(self, count: int, record: bool = True) -> None:
        for _ in range(count):
            start = time.perf_counter()
            out = self.run.step()
            jax.block_until_ready(out)
            if record:
                self.times.append(time.perf_counter() - start)
        self.last_loss = float(out["loss"])

    def checkpoint_bytes(self, directory: str) -> int:
        ckpt_cfg = ml_collections.ConfigDict(dict(every=0, every_minutes=0.0, keep=1,
                                                  keep_period=0, init_from=""))
        checkpointer = checkpoint_lib.Checkpointer(f"{directory}/{self.name}", ckpt_cfg)
        checkpointer.save(1, self.run.state, {}, {})
        checkpointer.wait()
        checkpointer.close()
        return disk_bytes(checkpointer.directory / "1")


def bench_lora(cfg: ml_collections.ConfigDict, steps: int = 2, rounds: int = 5) -> dict[str, float]:
    host = HostConditions()
    with tempfile.TemporaryDirectory(prefix="jaxlm_bench_lora_") as tmp:
        base = pathlib.Path(tmp) / "base"
        write_random_base(cfg, base)
        methods = [_Method(cfg, "lora", base), _Method(cfg, "full", base),
                   _Method(cfg, "lora", base, base_quant="nf4")]
        lora_m, full_m, qlora_m = methods
        for method in methods:  # one untimed warm step each
            method.steps(1, record=False)
        round_s = interleaved({m.name: (lambda m=m: m.steps(steps)) for m in methods}, rounds)
        disk = {method.name: method.checkpoint_bytes(tmp) for method in methods}
    cfg, mesh, m = lora_m.run.cfg, lora_m.run.mesh, lora_m.run.cfg.model

    full_s, lora_s = float(np.median(full_m.times)), float(np.median(lora_m.times))
    qlora_s = float(np.median(qlora_m.times))
    round_ratios = [a / b for a, b in zip(round_s["lora"], round_s["full"])]  # paired
    figures = {
        **median_min_max("full_step_s", full_m.times),
        **median_min_max("lora_step_s", lora_m.times), "step_ratio": lora_s / full_s,
        **median_min_max("step_ratio_per_round", round_ratios),
        "full_state_bytes": float(full_m.state_bytes),
        "lora_state_bytes": float(lora_m.state_bytes),
        "state_ratio": lora_m.state_bytes / full_m.state_bytes,
        "full_checkpoint_disk_bytes": float(disk["full"]),
        "lora_checkpoint_disk_bytes": float(disk["lora"]),
        "lora_trainable": float(lora_m.trainable), "full_trainable": float(full_m.trainable),
        **median_min_max("qlora_step_s", qlora_m.times), "qlora_step_ratio": qlora_s / lora_s,
        **{f"{m.name}_step_memory_bytes": float(m.memory) for m in methods},
        "qlora_memory_ratio": qlora_m.memory / lora_m.memory,
        **host.figures(),
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
        (f"step time ({rounds} rounds x {steps} steps, interleaved)", ""),
        ("  full", spread([t * 1e3 for t in full_m.times], ".0f", "ms")),
        ("  LoRA", spread([t * 1e3 for t in lora_m.times], ".0f", "ms")),
        ("  QLoRA (nf4 base)", spread([t * 1e3 for t in qlora_m.times], ".0f", "ms")),
        ("LoRA step / full step", (f"{lora_s / full_s:.3f}x of the medians (target <= 0.8x); "
                                   f"per round {spread(round_ratios, '.3f')}")),
        ("checkpointed state", f"full {format_bytes(full_m.state_bytes)} / LoRA "
                               f"{format_bytes(lora_m.state_bytes)}"),
        ("LoRA / full state", f"{100 * figures['state_ratio']:.2f}% (target < 5%)"),
        ("checkpoint on disk", f"full {format_bytes(disk['full'])} / LoRA "
                               f"{format_bytes(disk['lora'])} "
                               f"({100 * disk['lora'] / disk['full']:.2f}%)"),
        ("QLoRA step / LoRA step", f"{qlora_s / lora_s:.3f}x of the medians"),
        ("step memory (one device)", f"full {format_bytes(full_m.memory)} / LoRA "
                                     f"{format_bytes(lora_m.memory)} / QLoRA "
                                     f"{format_bytes(qlora_m.memory)} (XLA's memory analysis "
                                     f"of each compiled step: arguments, outputs and "
                                     f"temporaries, less what the outputs alias)"),
        ("QLoRA / LoRA step memory", f"{qlora_m.memory / lora_m.memory:.3f}x (target <= 0.6x)"),
        ("last loss", f"full {full_m.last_loss:.4f} / LoRA {lora_m.last_loss:.4f} / QLoRA "
                      f"{qlora_m.last_loss:.4f}"),
        *host.rows(),
    ])
    return figures
