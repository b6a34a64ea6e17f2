"""End to end on the default corpus: the loss falls, and a resumed run equals an
uninterrupted one step for step."""

import json
import shutil

import numpy as np
import pytest

from jaxlm.train import loop
from jaxlm.train.lm import CausalLM


@pytest.mark.slow
def test_loss_drops_on_the_default_corpus(run_config, tmp_path):
    logged = loop.train(CausalLM(run_config(steps=80, every=0)), tmp_path)
    losses = np.array([m["loss"] for m in logged])
    assert len(losses) == 80
    # Uniform guessing over 384 ids costs ln(384) = 5.95 nats; bytes of Python source are far
    # more predictable than that, and a working trainer finds out within 80 steps. (Single
    # steps are noisy: a batch holds few files, some much easier than others.)
    assert losses[0] > 5.0
    assert losses[-10:].mean() < 3.5, losses[-10:]


def test_resumed_run_equals_uninterrupted_run(run_config, tmp_path):
    full_dir = tmp_path / "full"
    full = loop.train(CausalLM(run_config(steps=6, every=2)), full_dir)

    # The same run "interrupted" after step 4: its workdir without the later checkpoint.
    cut_dir = tmp_path / "cut"
    shutil.copytree(full_dir, cut_dir)
    shutil.rmtree(cut_dir / "checkpoints" / "6")
    resumed = loop.train(CausalLM(run_config(steps=6, every=2)), cut_dir)

    assert [m["step"] for m in resumed] == [5, 6]
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [m[key] for m in resumed] == [m[key] for m in full[4:]], key  # bit for bit
    # One row per step: the rows logged after the checkpoint it resumed from are moved
    # aside, marked with the step the run went back to.
    lines = [json.loads(line) for line in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in lines] == [m["loss"] for m in full]
    superseded = [json.loads(line) for line in
                  (cut_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [(m["step"], m["superseded_by_resume_from"]) for m in superseded] == [(5, 4), (6, 4)]
    # The resumed attempt knows it redid steps 5 and 6 (the first attempt had reached them)
    # and what they had cost: its own time on them is recompute, none productive.
    account = json.loads((cut_dir / "goodput.jsonl").read_text().splitlines()[-1])
    assert (account["first_step"], account["last_step"], account["lost_steps"]) == (5, 6, 2)
    assert account["lost_before_s"] == sum(m["step_time_s"] for m in full[4:])
    assert account["time_recompute_s"] > 0 and account["time_step_s"] == account["goodput"] == 0
