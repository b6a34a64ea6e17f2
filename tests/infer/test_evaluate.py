"""Evaluation against float64 NumPy: the loss and perplexity of a run on a whole split (through
the API and `jaxlm eval`), and log-likelihood scoring of continuations."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm import errors
from jaxlm.cli import tasks
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import NonFiniteLoss, UserError
from jaxlm.infer import evaluate as evaluate_lib
from jaxlm.infer.generate import encode_prompt
from jaxlm.infer.score import ScoringError, score, score_tokens


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load("jaxlm_tests_model_reference", "model/reference.py")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run on a small local corpus (about 40 documents, a third held out for validation)."""
    tmp = tmp_path_factory.mktemp("eval_run")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) for _ in range(40)]
    (tmp / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    source = dict(kind="text", paths=str(tmp / "corpus.txt"), split_by="blank_line",
                  eval_fraction=0.3)
    cfg = run_fixture.tiny_run_config(str(tmp / "tfds"), data=dict(
        dataset="small", sources=ml_collections.ConfigDict({"small": source})))
    workdir = tmp / "run"
    params = run_fixture.write_run(workdir, cfg, seed=3)
    return workdir, cfg, reference.to_float64(params)


def evaluate(workdir, **kwargs):
    """What `jaxlm eval` computes: the run's own task evaluating its newest checkpoint."""
    return evaluate_lib.evaluate(tasks.for_run(workdir), workdir, **kwargs)


def reference_split_loss(cfg, params64):
    """Cross-entropy over every weighted target of the split, float64, independent of jaxlm's
    model code (the batches come from the same pipeline)."""
    sources.prepare(cfg.data, "small")
    it = pipeline.make_iterator(cfg.data, split="validation", tokenizer=ByteTokenizer())
    ce = tokens = 0.0
    for batch in it:
        logits = reference.forward_packed(params64, cfg.model, batch["inputs"],
                                          batch["positions"], batch["segment_ids"])
        w = batch["weights"].astype(bool)
        log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
        target = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        ce += float(np.sum((log_z - target)[w]))
        tokens += float(w.sum())
    it.close()
    return ce / tokens, tokens


def test_split_loss_and_perplexity_against_float64(run):
    workdir, cfg, params64 = run
    result = evaluate(workdir)
    ref_loss, ref_tokens = reference_split_loss(cfg, params64)
    assert result["tokens"] == ref_tokens > 200
    assert result["batches"] >= 2  # several batches, the last one padded
    np.testing.assert_allclose(result["loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(ref_loss), rtol=1e-5)
    assert result["split"] == "validation" and result["checkpoint"].endswith("checkpoints/1")

    first = evaluate(workdir, max_batches=1)
    assert first["batches"] == 1 and first["tokens"] < result["tokens"]
    with pytest.raises(UserError, match="split 'test' is not one of"):
        evaluate(workdir, split="test")


def test_eval_command_prints_the_same_figures(run):
    workdir, _, _ = run
    expected = evaluate(workdir)
    result = subprocess.run([sys.executable, "-m", "jaxlm.cli", "eval", "--workdir", str(workdir),
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["tokens"] == expected["tokens"]
    np.testing.assert_allclose(printed["loss"], expected["loss"], rtol=1e-6)

    bad = subprocess.run([sys.executable, "-m", "jaxlm.cli", "eval", "--workdir", str(workdir),
                          "--config.data.seq_len=4096"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "config.data.seq_len" in bad.stderr


def test_a_nan_loss_is_never_printed_as_a_figure(run, tmp_path):
    _, cfg, _ = run
    workdir = tmp_path / "diverged"
    run_fixture.write_run(workdir, cfg, seed=3, poisoned=True)
    with pytest.raises(NonFiniteLoss) as raised:
        evaluate(workdir)
    assert str(raised.value).startswith(
        f"small validation: the loss of {workdir / 'checkpoints' / '1'} is nan over ")
    assert str(raised.value).endswith(" targets: its parameters give non-finite logits")
    assert errors.exit_code(raised.value) == errors.NONFINITE
    with pytest.raises(UserError, match=r"small validation: nothing to evaluate \(0 targets "
                                        r"in 0 batches\)"):
        evaluate_lib.check_figures({"loss": float("nan"), "tokens": 0.0, "batches": 0},
                                   "small validation", workdir)


def log_softmax64(logits):
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.sum(np.exp(logits - m), -1, keepdims=True))


def reference_score(params64, model_cfg, context_ids, continuation_ids):
    ids = np.concatenate([context_ids, continuation_ids])
    logp = log_softmax64(reference.forward_document(params64, model_cfg, ids[:-1]))
    rows = np.arange(len(context_ids) - 1, len(ids) - 1)
    targets = ids[1:][rows]
    greedy = bool(np.all(np.argmax(logp[rows], -1) == targets))
    return float(np.sum(logp[rows, targets])), greedy


def test_score_against_float64_and_greedy_flag(run):
    workdir, cfg, params64 = run
    from jaxlm.infer import generate
    gen, tok, _ = generate.load(workdir)
    model = gen.model
    context = "alpha beta gamma"
    context_ids = encode_prompt(tok, context)
    # The model's own greedy continuation of 6 tokens (ids: a random model's bytes need not
    # be UTF-8), that continuation with its last token changed, and text choices.
    greedy_ids = gen.generate([context_ids], 6)[0]
    changed = greedy_ids.copy()
    changed[-1] = (changed[-1] + 1) % cfg.model.vocab_size
    texts = [" delta", " eta theta", "x"]
    choices = [greedy_ids, changed] + [tok.encode(t) for t in texts]
    results = score_tokens(model, [context_ids] * len(choices), choices, batch_size=3)
    for choice, (logprob, is_greedy) in zip(choices, results):
        ref_logprob, ref_greedy = reference_score(params64, cfg.model, context_ids, choice)
        np.testing.assert_allclose(logprob, ref_logprob, rtol=1e-5, atol=1e-4)
        assert is_greedy == ref_greedy
    assert results[0][1] and not any(g for _, g in results[1:])
    # The text API encodes the context as a document start and the continuation after it.
    by_text = score(model, tok, [context] * len(texts), texts)
    np.testing.assert_allclose([lp for lp, _ in by_text], [lp for lp, _ in results[2:]], rtol=1e-6)
    single = score(model, tok, context, texts[0])
    np.testing.assert_allclose(single[0], results[2][0], rtol=1e-6)
    assert single[1] == results[2][1]


def test_scoring_bad_input_names_the_request(run):
    workdir, _, _ = run
    from jaxlm.infer import generate
    gen, _, _ = generate.load(workdir)
    with pytest.raises(ScoringError, match="request 1: empty continuation"):
        score_tokens(gen.model, [[1, 5], [1, 6]], [[7], []])
    with pytest.raises(ScoringError, match=r"request 0: context \+ continuation is 70 tokens"):
        score_tokens(gen.model, [[1] * 60], [[5] * 10])
    with pytest.raises(ScoringError, match="request 0: empty context"):
        score_tokens(gen.model, [[]], [[5]])
