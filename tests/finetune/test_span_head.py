"""The QA span head's pieces against float64 NumPy and brute force: the loss over context
positions only, the best valid span (start <= end < start + max_answer_tokens, both in the
context), and classification's "first" and "mean" pooling."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.finetune import classify, qa

B, L = 5, 13


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    context = np.zeros((B, L), np.int32)
    for b, (lo, hi) in enumerate([(3, 11), (5, 6), (2, 13), (7, 12), (0, 0)]):  # last: padding
        context[b, lo:hi] = 1
    start = np.where(context > 0, rng.normal(size=(B, L)) * 3, qa.NEG)
    end = np.where(context > 0, rng.normal(size=(B, L)) * 3, qa.NEG)
    starts = np.asarray([4, 5, 12, 7, 0], np.int32)
    ends = np.asarray([6, 5, 12, 9, 0], np.int32)
    weights = np.asarray([1, 1, 1, 1, 0], np.float32)
    return context, start, end, {"starts": starts, "ends": ends, "label_weights": weights}


def test_loss_is_the_mean_of_start_and_end_cross_entropy_over_the_context(case):
    context, start, end, batch = case
    total, sums = qa.loss_sums_of(jnp.asarray(start, jnp.float32), jnp.asarray(end, jnp.float32),
                                  {k: jnp.asarray(v) for k, v in batch.items()})
    expected, correct = 0.0, 0
    for b in range(B - 1):  # the padding row weighs 0
        where = np.flatnonzero(context[b])
        for logits, target in ((start[b], batch["starts"][b]), (end[b], batch["ends"][b])):
            z = np.log(np.sum(np.exp(logits[where] - logits[where].max()))) + logits[where].max()
            expected += 0.5 * (z - logits[target])
        correct += int(np.argmax(start[b]) == batch["starts"][b]
                       and np.argmax(end[b]) == batch["ends"][b])
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(sums["weight_sum"]) == 4 and float(sums["correct_sum"]) == correct


@pytest.mark.parametrize("max_answer", [1, 3, 30])
def test_best_span_is_the_brute_force_best_valid_pair(case, max_answer):
    context, start, end, _ = case
    got_s, got_e = qa.best_spans(jnp.asarray(start, jnp.float32), jnp.asarray(end, jnp.float32),
                                 jnp.asarray(context), max_answer)
    for b in range(B - 1):
        where = np.flatnonzero(context[b])
        best = max(((start[b, s] + end[b, e], s, e) for s, e in itertools.product(where, where)
                    if s <= e < s + max_answer))
        assert (int(got_s[b]), int(got_e[b])) == best[1:], (b, max_answer)
    assert got_e[0] - got_s[0] < max_answer


def test_first_and_mean_pooling():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
    segments = np.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
    first = classify.pool(jnp.asarray(hidden), jnp.asarray(segments), "first")
    np.testing.assert_array_equal(np.asarray(first), hidden[:, 0])
    mean = classify.pool(jnp.asarray(hidden), jnp.asarray(segments), "mean")
    np.testing.assert_allclose(np.asarray(mean[:2]), [hidden[0, :3].mean(0), hidden[1].mean(0)],
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mean[2]), 0.0)
