"""Preference tuning (finetune.task=dpo): DPO and ORPO losses against a float64 NumPy
forward of each reply, log 2 while the policy is the reference, and LoRA DPO on the shipped
toy pairs learning to prefer the chosen replies of held-out pairs with its base untouched."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_fixture
from flax import nnx
from ft_helpers import TESTS, finetune, load_test_module, write_jsonl

from jaxlm import config as config_lib
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.finetune import examples, objectives, preference_data, records, templates
from jaxlm.model import zoo

reference = load_test_module("jaxlm_tests_reference", TESTS / "model" / "reference.py")

PAIRS = [{"prompt": "up alpha", "chosen": "ALPHA", "rejected": "alpha"},
         {"chosen": [{"role": "user", "content": "type of 3?"},
                     {"role": "assistant", "content": "int"}],
          "rejected": [{"role": "user", "content": "type of 3?"},
                       {"role": "assistant", "content": "I am not sure."}]},
         {"prompt": "up beta gamma", "chosen": "BETA GAMMA", "rejected": "no"}]


def reply_logprob64(params64, model_cfg, row):
    """float64 NumPy: the summed log-probabilities of a row's weighted targets."""
    n = int(np.count_nonzero(row["segment_ids"]))
    logits = reference.forward_document(params64, model_cfg, row["inputs"][:n])
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = logits[np.arange(n), row["targets"][:n]] - log_z
    return float((logp * row["weights"][:n]).sum()), float(row["weights"][:n].sum())


def test_dpo_and_orpo_losses_equal_float64_numpy(base_run, tmp_path):
    _, params, model_cfg = base_run
    recs = records.read_jsonl(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    rows, counts = preference_data.load_rows(recs, templates.BUILTIN["default"],
                                             ByteTokenizer(), 64, "error")
    assert counts.examples == 3
    rows = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in rows.items()}  # + padding
    policy = params
    ref_params = run_fixture.random_params(jax.tree.map(np.asarray, params), seed=9)

    cfg = config_lib.defaults()
    cfg.model = model_cfg
    cfg.finetune.update(task="dpo", dpo_beta=0.5)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    p, r = (jax.tree.map(jnp.asarray, x) for x in (policy, ref_params))
    batch = jax.tree.map(jnp.asarray, rows)

    # float64: log pi and log ref of every reply, then each loss.
    lp = {}
    for name, tree in (("policy", policy), ("reference", ref_params)):
        tree64 = reference.to_float64(tree)
        for side in preference_data.SIDES:
            got = [reply_logprob64(tree64, model_cfg, {k: rows[f"{side}_{k}"][i] for k in
                                                       preference_data.ROW_KEYS})
                   for i in range(3)]
            lp[name, side] = np.array([g[0] for g in got])
            lp["tokens", side] = np.array([g[1] for g in got])
    beta = 0.5

    def log_sigmoid(x):
        return -np.logaddexp(0.0, -x)

    z = beta * ((lp["policy", "chosen"] - lp["reference", "chosen"])
                - (lp["policy", "rejected"] - lp["reference", "rejected"]))
    dpo = objectives.DPO(cfg, ByteTokenizer(), None)
    dpo.reference_graphdef = graphdef
    _, sums = jax.jit(lambda p, r, b: dpo.sums(graphdef, p, None, b, True, reference=r))(p, r, batch)
    assert sums["weight_sum"] == 3  # the padding pair counts nothing
    np.testing.assert_allclose(sums["ce_sum"], -log_sigmoid(z).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["correct_sum"], (z > 0).sum())
    np.testing.assert_allclose(sums["reward_chosen_sum"],
                               beta * (lp["policy", "chosen"] - lp["reference", "chosen"]).sum(),
                               rtol=1e-4, atol=1e-5)
    # The policy as its own reference: every pair's loss is log 2.
    _, same = jax.jit(lambda p, b: dpo.sums(graphdef, p, None, b, True, reference=p))(p, batch)
    assert float(same["ce_sum"]) / 3 == pytest.approx(math.log(2), rel=1e-7)

    cfg.finetune.orpo = True
    orpo = objectives.DPO(cfg, ByteTokenizer(), None)
    _, sums = jax.jit(lambda p, b: orpo.sums(graphdef, p, None, b, True))(p, batch)
    mean = {s: lp["policy", s] / lp["tokens", s] for s in preference_data.SIDES}
    log_odds = {s: mean[s] - np.log1p(-np.exp(mean[s])) for s in preference_data.SIDES}
    loss = -mean["chosen"] - beta * log_sigmoid(log_odds["chosen"] - log_odds["rejected"])
    np.testing.assert_allclose(sums["ce_sum"], loss.sum(), rtol=1e-5)


def test_lora_dpo_learns_the_toy_preferences_and_keeps_its_base(make_cfg, base_run, tmp_path):
    base_dir = base_run[0]
    before = run_fixture.snapshot(base_dir)
    cfg = make_cfg("dpo", "lora", examples.data_path("dpo_tiny.jsonl"), steps=40, every=40)
    cfg.finetune.update(overlong="skip", eval_fraction=0.1, dpo_beta=0.1, template="plain")
    cfg.train.update(eval_every=40, log_every=10)
    logged = finetune(cfg, tmp_path / "dpo")
    evals = [m for m in logged if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 40]
    # Step 0: the adapters add nothing (B = 0), the policy is the reference.
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert evals[0]["eval_accuracy"] == 0 and evals[0]["eval_pairs"] >= 40
    # After training: held-out pairs prefer their chosen reply.
    assert evals[1]["eval_accuracy"] > 0.9 and evals[1]["eval_reward_margin"] > 0
    train = [m for m in logged if "loss" in m]
    assert train[-1]["loss"] < math.log(2) < train[0]["loss"] + 1e-3
    assert run_fixture.snapshot(base_dir) == before  # the base run is never written
