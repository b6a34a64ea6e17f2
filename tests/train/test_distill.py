"""Knowledge distillation (jaxlm/train/distill.py): the loss against a float64 NumPy
computation on a hand-built batch (packed documents, padding, zero loss weights,
temperature, computed blockwise); with alpha 0 the plain training loss bit for bit; a
teacher of another vocabulary, or shorter than the sequences, refused in one line.
(Preemption and exact resume: tests/train/test_one_loop.py runs distillation too.)"""

import jax
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from flax import nnx

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.model import zoo
from jaxlm.train import distill, lm

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
