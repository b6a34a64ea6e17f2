"""Knowledge distillation (jaxlm/train/distill.py): the loss against a float64 NumPy
computation on a hand-built batch (packed documents, padding, zero loss weights,
temperature, computed blockwise); with alpha 0 the plain training loss bit for bit; a
teacher of another vocabulary, or shorter than the sequences, refused in one line.
Offline (`jaxlm distill cache`, jaxlm/data/teacher_cache.py): with top-k = the vocabulary
the same loss as online, on a hand-built batch and through whole runs; a truncated top-k
against float64 NumPy; a cached run preempted and resumed; caches that do not fit refused.
(Preemption and exact resume of online distillation: tests/train/test_one_loop.py.)"""

import json
import os
import re
import signal

import jax
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from flax import nnx

from jaxlm import cli, errors
from jaxlm import config as config_lib
from jaxlm.cli import tasks
from jaxlm.errors import ConfigError
from jaxlm.finetune.tasks import FinetuneTask
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import distill, lm, loop, pretraining
from jaxlm.train import seq2seq as seq2seq_train

VOCAB = 64


def model_config(**sizes):
    cfg = config_lib.defaults().model
    cfg.update(family="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
               n_kv_heads=2, d_ff=48, max_seq_len=32, remat="none")
    cfg.update(sizes)
    return cfg


def hand_batch():
    """Two rows of 16: row 0 packs two documents and ends in padding; row 1 is one
    document with some loss weights zero (a prompt)."""
    rng = np.random.default_rng(0)
    segments = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16])
    positions = np.array([list(range(6)) + list(range(7)) + [0] * 3, list(range(16))])
    weights = (segments > 0).astype(np.float32)
    weights[0, 5] = weights[0, 12] = 0.0  # each document's last position has no target
    weights[1, :4] = 0.0
    return {"inputs": rng.integers(0, VOCAB, (2, 16)).astype(np.int32),
            "targets": rng.integers(0, VOCAB, (2, 16)).astype(np.int32),
            "segment_ids": segments.astype(np.int32), "positions": positions.astype(np.int32),
            "weights": weights}


def logits64(graphdef, params, batch):
    return np.asarray(nnx.merge(graphdef, params)(
        batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)


def reference(s, t, batch, alpha, temperature):
    """float64 NumPy: alpha T^2 KL(t_T || s_T) + (1 - alpha) CE, summed over weights."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    w = batch["weights"].astype(np.float64)
    log_p = log_softmax(s)
    ce = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
    log_s, log_t = log_softmax(s / temperature), log_softmax(t / temperature)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    ce_sum, kd_sum = (ce * w).sum(), temperature ** 2 * (kl * w).sum()
    return alpha * kd_sum + (1 - alpha) * ce_sum, ce_sum, kd_sum


@pytest.fixture(scope="module")
def models():
    """(graphdef, params) of a student and of a wider, deeper teacher, random weights."""
    student = nnx.split(zoo.create(model_config(), 1))
    teacher = nnx.split(zoo.create(model_config(d_model=48, n_layers=3, d_ff=64), 2))
    return student, teacher


@pytest.mark.parametrize("block", [0, 4])  # the whole row at once; 4 blocks of 4 positions
def test_the_loss_equals_a_float64_computation(models, block):
    (graphdef, params), (t_graphdef, t_params) = models
    batch = hand_batch()
    dist = config_lib.defaults().distill
    dist.update(alpha=0.3, temperature=2.0)
    objective, sums = jax.jit(lambda p, t, b: distill.distill_sums(
        graphdef, p, t_graphdef, t, b, dist, 0.0, block))(params, t_params, batch)
    want, ce, kd = reference(logits64(graphdef, params, batch),
                             logits64(t_graphdef, t_params, batch), batch, 0.3, 2.0)
    np.testing.assert_allclose(float(sums["ce_sum"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(sums["kd_sum"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(objective), want, rtol=1e-5)
    assert float(sums["weight_sum"]) == batch["weights"].sum() == 23
    # A teacher equal to the student teaches nothing: KL 0.
    _, same = jax.jit(lambda p, b: distill.distill_sums(graphdef, p, graphdef, p, b, dist, 0.0,
                                                        block))(params, batch)
    assert abs(float(same["kd_sum"])) < 1e-4


def test_alpha_zero_is_plain_training_bit_for_bit(models):
    (graphdef, params), (t_graphdef, t_params) = models
    batch = hand_batch()
    dist = config_lib.defaults().distill
    dist.update(alpha=0.0, temperature=3.0)

    def both(p, t, b):
        plain = jax.value_and_grad(lambda p: lm.loss_sums(graphdef, p, b, 1e-4, 4)[0])(p)
        taught = jax.value_and_grad(lambda p: distill.distill_sums(
            graphdef, p, t_graphdef, t, b, dist, 1e-4, 4)[0])(p)
        return plain, taught

    (loss, grads), (taught_loss, taught_grads) = jax.jit(both)(params, t_params, batch)
    assert float(loss) == float(taught_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(taught_grads)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_mixture_student_keeps_its_routers_losses(models):
    """A moe student's taught objective with alpha 0 is its pretraining objective, the
    routers' losses included with optim's coefficients, bit for bit (value and gradients);
    without those coefficients it is not."""
    _, (t_graphdef, t_params) = models
    graphdef, params = nnx.split(zoo.create(model_config(
        family="moe", n_experts=4, experts_per_token=2, d_expert=16), 3))
    batch = hand_batch()
    dist = config_lib.defaults().distill
    dist.update(alpha=0.0, temperature=3.0)
    optim = config_lib.defaults().optim
    optim.update(z_loss=1e-4, loss_block=4, moe_aux_loss=0.5, moe_z_loss=0.25)
    taught = distill.teacher_sums("decoder", optim)

    def both(p, t, b):
        plain = jax.value_and_grad(
            lambda p: lm.loss_sums(graphdef, p, b, 1e-4, 4, (0.5, 0.25))[0])(p)
        unrouted = lm.loss_sums(graphdef, p, b, 1e-4, 4)[0]
        return plain, jax.value_and_grad(lambda p: taught(graphdef, p, t_graphdef, t, b,
                                                          dist)[0])(p), unrouted

    (loss, grads), (taught_loss, taught_grads), unrouted = jax.jit(both)(params, t_params, batch)
    assert float(loss) == float(taught_loss) and float(loss) > float(unrouted) + 1.0
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(taught_grads)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_teacher_that_cannot_teach_is_one_line_exit_2(stdlib_data_dir, tmp_path, capsys):
    """Another vocabulary (both named); fewer positions than the student's sequences."""
    teacher = tmp_path / "teacher"
    cfg = run_fixture.tiny_run_config(stdlib_data_dir)  # 64 positions
    cfg.model.vocab_size = 512
    run_fixture.write_run(teacher, cfg)
    for seq_len, says in ((32, ["the teacher's tokenizer and vocabulary", "512", "the student's"]),
                          (128, ["holds 64 positions", "data.seq_len is 128"])):
        code = cli.main(["train", "--config", str(run_fixture.CONFIG_DIR / "tiny.py"),
                         f"--config.data.data_dir={stdlib_data_dir}",
                         f"--config.data.seq_len={seq_len}",
                         f"--config.distill.teacher={teacher}", "--workdir", str(tmp_path / "s")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "config.distill.teacher" in err and all(s in err for s in says), err
        assert not (tmp_path / "s" / "checkpoints").exists()


def log_softmax64(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("block", [0, 4])
def test_offline_with_the_whole_vocabulary_is_the_online_loss(models, block):
    """The teacher's top-k logits as the cache holds them: k = V gives the online loss and
    gradients (up to float32 summation order); k = 5, the KL to the teacher renormalised
    over its top 5, as float64 NumPy computes it."""
    (graphdef, params), (t_graphdef, t_params) = models
    batch = hand_batch()
    dist = config_lib.defaults().distill
    dist.update(alpha=0.3, temperature=2.0)
    online = jax.jit(jax.value_and_grad(lambda p: distill.distill_sums(
        graphdef, p, t_graphdef, t_params, batch, dist, 1e-4, block), has_aux=True))(params)
    for k in (VOCAB, 5):
        t_logits, t_ids = jax.jit(lambda t, b: distill.teacher_topk(t_graphdef, t, b, k, block)
                                  )(t_params, batch)
        cached = {**batch, "teacher_logits": t_logits, "teacher_ids": t_ids}
        optim = config_lib.defaults().optim
        optim.update(z_loss=1e-4, loss_block=block)
        (objective, sums), grads = jax.jit(jax.value_and_grad(lambda p: distill.cached_distill_sums(
            graphdef, p, cached, dist, optim), has_aux=True))(params)
        if k == VOCAB:
            (want, want_sums), want_grads = online
            np.testing.assert_allclose(float(objective), float(want), rtol=1e-6)
            for key in ("ce_sum", "kd_sum", "z_sum", "weight_sum"):
                np.testing.assert_allclose(float(sums[key]), float(want_sums[key]), rtol=1e-5)
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
            continue
        t64, s64 = logits64(t_graphdef, t_params, batch), logits64(graphdef, params, batch)
        ids = np.argsort(-t64, axis=-1)[..., :k]
        np.testing.assert_array_equal(np.sort(np.asarray(t_ids), -1), np.sort(ids, -1))
        log_t = log_softmax64(np.take_along_axis(t64, ids, -1) / 2.0)
        log_s = np.take_along_axis(log_softmax64(s64 / 2.0), ids, -1)
        kd = 4.0 * ((np.exp(log_t) * (log_t - log_s)).sum(-1) * batch["weights"]).sum()
        np.testing.assert_allclose(float(sums["kd_sum"]), kd, rtol=1e-5)


def cached_config(data_dir, teacher, **distill_keys):
    cfg = run_fixture.tiny_run_config(data_dir, n_layers=1)
    cfg.train.update(steps=4, log_every=1)
    cfg.checkpoint.update(every=1000, keep=3)
    cfg.distill.update(teacher=str(teacher), alpha=0.5, temperature=2.0, **distill_keys)
    return cfg


def test_a_cached_teacher_trains_as_the_online_one_and_resumes(stdlib_data_dir, tmp_path,
                                                                monkeypatch, capsys):
    """`jaxlm distill cache --top-k <vocabulary>` then a cached run: the online run's losses
    and gradient norms at every step; the cached run preempted at step 2 resumes from its
    cache position to the same figures."""
    teacher, cache = tmp_path / "teacher", tmp_path / "cache"
    run_fixture.write_run(teacher, run_fixture.tiny_run_config(stdlib_data_dir), seed=3)
    cfg = cached_config(stdlib_data_dir, teacher)
    vocab = cfg.model.vocab_size
    overrides = [f"--config.data.data_dir={stdlib_data_dir}", f"--config.distill.teacher={teacher}",
                 "--config.model.n_layers=1", "--config.model.d_model=32",
                 "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
                 "--config.model.d_ff=48", "--config.data.seq_len=32",
                 "--config.data.global_batch_size=8"]
    code = cli.main(["distill", "cache", "--config", str(run_fixture.CONFIG_DIR / "tiny.py"),
                     "--out", str(cache), "--top-k", str(vocab), "--steps", "4", *overrides])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((cache / "meta.json").read_text())
    assert (meta["steps"], meta["top_k"], meta["global_batch"]) == (4, vocab, 8)

    online = [m for m in loop.train(pretraining.task(cfg), tmp_path / "online") if "loss" in m]
    cached_cfg = cached_config(stdlib_data_dir, teacher, cache=str(cache))
    read = {"batches": 0}
    real = loop.batch_stats

    def preempting(batch, bos_id):
        read["batches"] += 1
        if read["batches"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, bos_id)

    monkeypatch.setattr(loop, "batch_stats", preempting)
    with pytest.raises(errors.Preempted):
        loop.train(pretraining.task(cached_cfg), tmp_path / "cached")
    monkeypatch.undo()
    loop.train(pretraining.task(cached_cfg), tmp_path / "cached")
    cached = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text(
        ).splitlines() if "loss" in json.loads(x)]
    assert [m["step"] for m in cached] == [1, 2, 3, 4]
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in cached], [m[key] for m in online],
                                   rtol=2e-5, err_msg=key)
    # Its evaluation is the student's own: what `jaxlm eval` reads of the run.
    task = pretraining.task(cached_cfg)
    state, _ = task.restore_newest(tmp_path / "cached")
    plain = tasks.for_run(tmp_path / "cached")
    assert task.evaluate(state, max_batches=2) == plain.evaluate(
        plain.restore_newest(tmp_path / "cached")[0], max_batches=2)

    # Caches that do not fit: fewer steps than train.steps, other batches; one line, exit 2.
    capsys.readouterr()
    for extra, says in ((["--config.train.steps=5"], "holds 4 steps; train.steps is 5"),
                        (["--config.data.shuffle_seed=9"], "was made for other batches")):
        code = cli.main(["train", "--config", str(run_fixture.CONFIG_DIR / "tiny.py"),
                         *overrides, f"--config.distill.cache={cache}", "--config.train.steps=4",
                         *extra, "--workdir", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, err
        assert not (tmp_path / "refused" / "checkpoints").exists()


def test_sft_distillation_teaches_the_response_tokens(stdlib_data_dir, tmp_path):
    """A fine-tuning (SFT) student with a teacher: the step's objective on the first SFT
    batch (templated examples packed, loss on the responses only) against float64 NumPy of
    both models' logits; evaluation stays the student's own cross-entropy. Classification
    takes no teacher, and fine-tuning no cache."""
    base, teacher = tmp_path / "base", tmp_path / "teacher"
    run_fixture.write_run(base, run_fixture.tiny_run_config(stdlib_data_dir), seed=1)
    run_fixture.write_run(teacher, run_fixture.tiny_run_config(
        stdlib_data_dir, d_model=48, n_layers=3, d_ff=64), seed=2)
    cfg = config_lib.load_config_file(run_fixture.CONFIG_DIR / "sft_tiny.py")
    cfg.finetune.update(base=str(base), overlong="skip")
    cfg.data.update(seq_len=64, global_batch_size=8)
    cfg.optim.z_loss = 0.0
    cfg.distill.update(teacher=str(teacher), alpha=0.3, temperature=2.0)
    task = FinetuneTask(cfg)
    mesh = mesh_lib.make_mesh(task.cfg.mesh)
    with mesh_lib.use(mesh):
        task.build(mesh)
        state = task.init_state()
        batches = task.train_batches(list(range(8)), lambda line: None)
        host = next(batches)
        batches.close()
        sums_fn = task.objective().sums
        objective, sums = jax.jit(lambda t, f, b: sums_fn(t, f, b, jax.random.key(0), True))(
            {"params": state["params"]}, task.frozen, task.to_global(host))
        eval_sums = task.eval_sums({"params": state["params"]}, task.frozen, task.to_global(host))
    assert 0 < host["weights"].sum() < (host["segment_ids"] > 0).sum()  # responses only
    student = nnx.split(zoo.abstract(task.cfg.model))[0]
    teacher_graphdef = nnx.split(zoo.abstract(task.teacher.model))[0]
    want, ce, kd = reference(logits64(student, jax.device_get(state["params"]), host),
                             logits64(teacher_graphdef, jax.device_get(task.frozen["teacher"]),
                                      host), host, 0.3, 2.0)
    np.testing.assert_allclose(float(sums["ce_sum"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(sums["kd_sum"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(objective), want, rtol=1e-5)
    assert "kd_sum" not in eval_sums
    np.testing.assert_allclose(float(eval_sums["ce_sum"]), ce, rtol=1e-5)

    for update, says in (({"finetune.task": "classify"}, "'sft' or 'seq2seq', not 'classify'"),
                         ({"distill.cache": str(tmp_path)}, "fine-tuning (sft, seq2seq)")):
        bad = config_lib.load_config_file(run_fixture.CONFIG_DIR / "sft_tiny.py")
        bad.distill.teacher = str(teacher)
        for key, value in update.items():
            section, name = key.split(".")
            bad[section][name] = value
        with pytest.raises(ConfigError, match=re.escape(says)):
            config_lib.validate(bad, 1)


def t5_config(**sizes):
    cfg = config_lib.load_config_file(run_fixture.CONFIG_DIR / "t5_tiny.py").model
    cfg.update(vocab_size=VOCAB, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=4,
               n_kv_heads=4, head_dim=8, d_ff=48, max_seq_len=32)
    cfg.update(sizes)
    return cfg


def positions(segments):
    """Each position's index inside its segment (0 for padding)."""
    out = np.zeros_like(segments)
    for row, seg in zip(out, segments):
        for s in set(seg.tolist()) - {0}:
            where = np.flatnonzero(seg == s)
            row[where] = np.arange(len(where))
    return out


def test_an_encoder_decoder_student_is_taught_on_its_decoder_targets():
    """Span corruption and seq2seq fine-tuning: a T5 student against a deeper T5 teacher on
    a hand-built row pair (two packed examples in row 0, padding), the decoder targets'
    KL and cross-entropy against float64 NumPy of both models' teacher-forced logits."""
    rng = np.random.default_rng(1)
    enc_seg = np.array([[1] * 7 + [2] * 3 + [0] * 2, [1] * 12], np.int32)
    dec_seg = np.array([[1] * 4 + [2] * 3 + [0], [1] * 6 + [0] * 2], np.int32)
    targets = rng.integers(1, VOCAB, dec_seg.shape).astype(np.int32)
    batch = {"inputs": rng.integers(1, VOCAB, enc_seg.shape).astype(np.int32),
             "input_segment_ids": enc_seg, "input_positions": positions(enc_seg),
             "decoder_inputs": np.where(dec_seg > 0, np.roll(targets, 1, axis=1), 0).astype(
                 np.int32), "targets": targets, "segment_ids": dec_seg,
             "positions": positions(dec_seg), "weights": (dec_seg > 0).astype(np.float32)}
    student = nnx.split(zoo.create(t5_config(), 1))
    teacher = nnx.split(zoo.create(t5_config(d_model=48, n_layers=3, n_decoder_layers=3), 2))
    dist = config_lib.defaults().distill
    dist.update(alpha=0.3, temperature=2.0)
    optim = config_lib.defaults().optim
    optim.z_loss = 0.0
    taught = distill.teacher_sums("encoder_decoder", optim)
    assert taught.func is distill.seq2seq_distill_sums
    objective, sums = jax.jit(lambda p, t, b: taught(student[0], p, teacher[0], t, b, dist))(
        student[1], teacher[1], batch)
    s64, t64 = (np.asarray(seq2seq_train.logits(g, p, batch), np.float64)
                for g, p in (student, teacher))
    want, ce, kd = reference(s64, t64, batch, 0.3, 2.0)
    np.testing.assert_allclose(float(sums["ce_sum"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(sums["kd_sum"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(objective), want, rtol=1e-5)
    assert float(sums["weight_sum"]) == 13
