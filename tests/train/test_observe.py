"""What a run shows of itself: evaluation during training, the goodput account and a
profiler trace of a window of steps (jaxlm.train.loop, goodput, profiling)."""

import gzip
import json
import time

import jax
import pytest

from jaxlm.infer import evaluate as evaluate_lib
from jaxlm.train import loop
from jaxlm.train.lm import CausalLM


def test_in_loop_evaluation_is_jaxlm_eval_and_leaves_training_alone(run_config, tmp_path):
    plain = loop.train(CausalLM(run_config(steps=4, every=4)), tmp_path / "plain")
    cfg = run_config(steps=4, every=4)
    cfg.train.update(eval_every=2, eval_batches=3)
    task = CausalLM(cfg)
    begin = time.perf_counter()
    logged = loop.train(task, tmp_path / "eval")
    wall = time.perf_counter() - begin

    # Training is bit-identical with evaluation on: it reads batches of its own.
    train = [m for m in logged if "loss" in m]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in train] == [m[key] for m in plain], key
    evals = [m for m in logged if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    # The same 3 batches each time, every row of them full (one packed stream dealt 16
    # rows per batch: no padding rows).
    assert all(m["eval_batches"] == 3 and m["eval_tokens"] == 3 * 16 * 128 for m in evals)
    assert evals[0]["eval_loss"] > evals[2]["eval_loss"]
    # `jaxlm eval` of the last checkpoint on the same batches gives the same figures.
    after = evaluate_lib.evaluate(CausalLM(cfg), tmp_path / "eval", max_batches=3)
    assert after["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
    assert after["tokens"] == evals[-1]["eval_tokens"]

    # The account covers the call: its wall time is the call's within 2%, its parts add up to
    # it, and the unnamed rest ("other": logging, metrics rows, closing) is under 5% of it
    # (a run of a few seconds here).
    account = json.loads((tmp_path / "eval" / "goodput.jsonl").read_text())  # one attempt
    parts = [account[f"time_{p}_s"] for p in ("startup", "compile", "data", "step",
                                               "recompute", "checkpoint", "eval")]
    assert account["wall_s"] == pytest.approx(wall, rel=0.02)
    assert sum(parts) + account["time_other_s"] == pytest.approx(account["wall_s"], rel=1e-6)
    assert account["time_other_s"] < 0.05 * wall
    assert min(parts[:4] + parts[5:]) > 0 and account["time_recompute_s"] == 0
    assert account["goodput"] == pytest.approx(account["time_step_s"] / account["wall_s"])
    assert (account["first_step"], account["last_step"], account["lost_steps"]) == (1, 4, 0)
    # Every log row carries the account so far.
    assert all(0 < m["goodput"] < 1 and m["wall_s"] < account["wall_s"] for m in train)


def test_a_mixture_of_experts_is_evaluated_in_the_loop_and_by_jaxlm_eval(run_config, tmp_path):
    """A `moe` model's evaluation sums carry a per-expert load (a vector): evaluating adds
    them up like the scalars (it failed on them before), in the loop and in `jaxlm eval`."""
    cfg = run_config(steps=4, every=4)
    cfg.model.update(family="moe", n_experts=4, experts_per_token=2, d_expert=48)
    cfg.train.update(eval_every=4, eval_batches=2)
    logged = loop.train(CausalLM(cfg), tmp_path / "moe")
    evals = [m for m in logged if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 4] and evals[0]["eval_loss"] > evals[1]["eval_loss"]
    after = evaluate_lib.evaluate(CausalLM(cfg), tmp_path / "moe", max_batches=2)
    assert after["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)


def test_profile_window_is_traced_and_profiling_off_never_calls_the_profiler(
        run_config, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("profiler called with train.profile_steps unset")

    with monkeypatch.context() as patched:
        for name in ("start_trace", "stop_trace", "StepTraceAnnotation", "trace"):
            patched.setattr(jax.profiler, name, refuse)
        loop.train(CausalLM(run_config(steps=2, every=2)), tmp_path / "off")
    assert not (tmp_path / "off" / "profile").exists()

    cfg = run_config(steps=5, every=5)
    cfg.train.profile_steps = "2:3"
    loop.train(CausalLM(cfg), tmp_path / "on")
    traces = list((tmp_path / "on" / "profile").glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert len(traces) == 1 and list(traces[0].parent.glob("*.xplane.pb"))
    trace = json.loads(gzip.open(traces[0]).read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps == [2, 3, 4]
