"""Fine-tuning runs end to end on the tiny base: LoRA trains adapters only and leaves the
base bit-identical, its checkpoint holds only adapters, `jaxlm lora merge` gives the logits
of base + adapters, a stopped and resumed run equals an uninterrupted one, and a classifier
learns a synthetic task (its reported eval figures checked against a recomputation)."""

from __future__ import annotations

import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ft_helpers import finetune, write_jsonl

from jaxlm import cli
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.finetune import classify, lora, merge
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.parallel import mesh as mesh_lib


def test_lora_checkpoint_holds_only_adapters(lora_run, base_run):
    workdir, logged, _ = lora_run
    train = [m for m in logged if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    saved = checkpoint_lib.saved_arrays(workdir / "checkpoints" / "6")
    assert {name.split("/")[0] for name in saved} == {"step", "adapters", "opt_state",
                                                      "nonfinite_steps"}
    adapter_leaves = [n for n in saved if n.startswith("adapters/")]
    assert len(adapter_leaves) == 2 * 7  # q, k, v, o, gate, up, down: A and B each
    assert all(n.rsplit("/", 1)[1] in ("lora_a", "lora_b") for n in adapter_leaves)
    base_values = sum(np.asarray(x).size for x in jax.tree.leaves(base_run[1]))
    saved_values = sum(int(np.prod(a.shape)) for a in saved.values())
    assert saved_values < 0.5 * base_values  # adapters + their moments, no base parameter


def build_lora_step(cfg):
    """(step, fresh state, frozen base, train rows) as `jaxlm finetune` builds them."""
    cfg.train.update(steps=3, seed=0)
    task = FinetuneTask(cfg)
    mesh = mesh_lib.make_mesh(task.cfg.mesh)
    train_rows, _ = task.load_data()
    with mesh_lib.use(mesh):
        task.build(mesh)
        state = task.init_state()
    return task.train_step, state, task.frozen, train_rows, mesh


def test_lora_step_keeps_the_base_bit_identical(make_cfg, sft_file, base_run):
    """The train step reads the base and never writes it: after three steps that change the
    adapters, the base arrays equal the checkpoint's bit for bit."""
    step, state, frozen, rows, mesh = build_lora_step(make_cfg("sft", "lora", sft_file))
    assert set(state) == {"step", "adapters", "opt_state", "nonfinite_steps"}
    with mesh_lib.use(mesh):
        for k in range(3):
            state, _ = step(state, frozen, {key: v[8 * k:8 * (k + 1)] for key, v in rows.items()})
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want),
                 frozen["params"], jax.tree.map(np.asarray, base_run[1]))
    b_max = max(float(jnp.abs(v["lora_b"]).max()) for g in state["adapters"]["blocks"].values()
                for v in g.values())
    assert b_max > 0  # the adapters did train


def test_gradient_accumulation_gives_the_update_of_one_batch(make_cfg, sft_file):
    """Two microbatches of 8 rows give the loss and adapter update of one batch of 16."""
    out = []
    for accum in (1, 2):
        cfg = make_cfg("sft", "lora", sft_file, optim={"grad_accum_steps": accum},
                       data={"global_batch_size": 16})
        step, state, frozen, rows, mesh = build_lora_step(cfg)
        with mesh_lib.use(mesh):
            for k in range(2):  # the second step applies a nonzero update to nonzero B
                batch = {key: v[16 * k:16 * (k + 1)] for key, v in rows.items()}
                state, metrics = step(state, frozen, batch)
        out.append((jax.device_get(metrics), jax.device_get(state["adapters"])))
    (m1, a1), (m2, a2) = out
    for key in ("loss", "grad_norm", "target_tokens"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a2, a1)


def test_resumed_lora_run_equals_uninterrupted_run(lora_run):
    workdir, full, cfg = lora_run
    cut = workdir.parent / "lora_cut"
    shutil.copytree(workdir, cut)
    shutil.rmtree(cut / "checkpoints" / "6")
    resumed = finetune(cfg, cut)
    train = lambda logged: [m for m in logged if "loss" in m]  # noqa: E731
    assert [m["step"] for m in train(resumed)] == [4, 5, 6]
    for key in ("loss", "grad_norm", "learning_rate"):  # bit for bit, dropout included
        assert [m[key] for m in train(resumed)] == [m[key] for m in train(full)[3:]], key
    assert [m for m in resumed if "eval_loss" in m][-1]["eval_loss"] == \
        [m for m in full if "eval_loss" in m][-1]["eval_loss"]


def test_lora_merge_gives_the_logits_of_base_plus_adapters(lora_run, base_run, tmp_path):
    workdir, _, _ = lora_run
    out = tmp_path / "merged"
    assert cli.main(["lora", "merge", str(workdir), "--out", str(out)]) == 0
    task, state, _ = merge.restore_run(workdir)
    cfg = task.cfg
    tokens = np.random.default_rng(0).integers(3, 259, size=(2, 40)).astype(np.int32)
    combined = lora.combine(task.frozen["params"], state["adapters"])
    expected = jax.jit(lambda p, t: nnx.merge(task.eval_graphdef, p)(t))(combined, tokens)

    from jaxlm.infer import generate
    gen, tokenizer, merged_cfg = generate.load(out)  # what `jaxlm generate --workdir OUT` does
    got = jax.jit(lambda p, t: nnx.merge(gen.graphdef, p)(t))(gen.params, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    merged = jax.device_get(gen.params)
    np.testing.assert_array_equal(merged["embed"], np.asarray(base_run[1]["embed"]))
    base_wq = np.asarray(base_run[1]["blocks"]["attn"]["wq"])
    assert not np.array_equal(merged["blocks"]["attn"]["wq"], base_wq)  # adapted: changed
    assert merged_cfg.model.d_model == cfg.model.d_model and tokenizer.name == "byte"


def keyword_lines(count: int, seed: int) -> list[dict]:
    """Label = which of three keywords a line of random filler letters contains."""
    rng = random.Random(seed)
    keywords = ("cat", "dog", "owl")
    out = []
    for _ in range(count):
        label = rng.randrange(3)
        filler = ["".join(rng.choice("abeghijkmnpqrsu") for _ in range(rng.randint(2, 4)))
                  for _ in range(rng.randint(1, 3))]
        filler.insert(rng.randint(0, len(filler)), keywords[label])
        out.append({"text": " ".join(filler), "label": label})
    return out


def test_classifier_learns_a_synthetic_task_and_reports_eval_figures(make_cfg, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", keyword_lines(400, seed=0))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", keyword_lines(64, seed=1))
    cfg = make_cfg("classify", "full", train_file, steps=40, every=40,
                   finetune={"eval_file": str(eval_file), "num_labels": 3, "pooling": "mean"},
                   data={"seq_len": 24, "global_batch_size": 16},
                   optim={"learning_rate": 3e-3, "warmup_steps": 2})
    logged = finetune(cfg, tmp_path / "run")
    evals = [m for m in logged if "eval_accuracy" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["eval_accuracy"] > 0.9, evals

    # The reported figures, recomputed from the saved state with NumPy.
    task = FinetuneTask(cfg, tmp_path / "run")
    _, eval_rows = task.load_data()
    mesh = mesh_lib.make_mesh(task.cfg.mesh)
    task.build(mesh)
    ckpt = checkpoint_lib.Checkpointer(tmp_path / "run", task.cfg.checkpoint)
    state, _, _ = ckpt.restore(40, task.spec.abstract)
    ckpt.close()
    logits = np.asarray(jax.jit(lambda p, h, b: classify.logits(task.eval_graphdef, p, h, b, "mean"))(
        state["params"], state["head"], {k: eval_rows[k] for k in ("inputs", "positions",
                                                                   "segment_ids")}), np.float64)
    labels = eval_rows["labels"]
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    loss = float(np.mean(log_z - logits[np.arange(len(labels)), labels]))
    accuracy = float(np.mean(logits.argmax(1) == labels))
    assert evals[-1]["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert evals[-1]["eval_loss"] == pytest.approx(loss, rel=1e-5)
