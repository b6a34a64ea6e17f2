"""Generate, eval and score straight from an unmerged LoRA run: each gives what the same
command gives on the run `jaxlm lora merge` writes (token for token, figures to float
tolerance), the LoRA run is never modified, a base that changed since training is refused,
and the merge message says the LoRA run and its base are untouched."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import jax
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm import cli
from jaxlm.infer import generate
from jaxlm.infer.score import score

PROMPTS = ["up alpha", "<|user|>\nup kappa", "theta"]


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    """(LoRA run, its merged copy written by `jaxlm lora merge`, the merge's stdout, the
    files of the LoRA run and of its base before anything read them). When every test that
    uses it has run (merge, generate, eval, score, in any order or selection), the LoRA run
    and its base must be as they were."""
    workdir, base = lora_run[0], pathlib.Path(lora_run[2].finetune.base)
    before = {workdir: run_fixture.snapshot(workdir), base: run_fixture.snapshot(base)}
    out = tmp_path_factory.mktemp("lora_merged") / "merged"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["lora", "merge", str(workdir), "--out", str(out)]) == 0
    yield workdir, out, printed.getvalue(), before
    for directory, files in before.items():
        assert run_fixture.snapshot(directory) == files, f"{directory} was changed"


def test_merge_message_says_the_lora_run_and_base_are_untouched(merged):
    workdir, out, stdout, _ = merged
    assert f"wrote a new run {out}" in stdout, stdout
    assert "the LoRA run and its base are unchanged" in stdout, stdout
    assert str(workdir) in stdout


def test_generate_from_lora_run_equals_merged_run_token_for_token(merged, base_run, capsys):
    workdir, out, _, _ = merged
    outputs, params = {}, {}
    for name, run in (("lora", workdir), ("merged", out)):
        gen, tokenizer, _ = generate.load(run)
        prompts = [generate.encode_prompt(tokenizer, p) for p in PROMPTS]
        stop = generate.default_stop_ids(tokenizer, out / "checkpoints" / "6")
        outputs[name] = [o.tolist() for o in gen.generate(prompts, 12, stop_tokens=stop)]
        params[name] = jax.device_get(gen.params)
    assert outputs["lora"] == outputs["merged"]
    # The merge done in memory is the one `jaxlm lora merge` wrote, bit for bit, and the
    # adapters did change the base's weights.
    jax.tree.map(np.testing.assert_array_equal, params["lora"], params["merged"])
    base_wq = np.asarray(base_run[1]["blocks"]["attn"]["wq"])
    assert np.abs(params["lora"]["blocks"]["attn"]["wq"] - base_wq).max() > 1e-4
    # `jaxlm generate` on the LoRA run prints the merged run's greedy text and exits 0.
    argv = ["generate", "--workdir", str(workdir), "--max-new-tokens", "12"]
    assert cli.main(argv + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    expected = "".join(
        f"--- prompt {i} ---\n{text}" + "".join(generate.stream_text(
            tokenizer, [t for t in ids if t not in stop], prefix_ids=prompts[i])) + "\n"
        for i, (text, ids) in enumerate(zip(PROMPTS, outputs["merged"])))
    assert capsys.readouterr().out == expected


def test_eval_from_lora_run_equals_merged_run(merged, capsys):
    workdir, out, _, _ = merged
    figures = []
    for run in (workdir, out):
        assert cli.main(["eval", "--workdir", str(run), "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out))
    lora_figures, merged_figures = figures
    assert lora_figures["tokens"] == merged_figures["tokens"] > 0
    assert lora_figures["loss"] == pytest.approx(merged_figures["loss"], rel=1e-5)
    assert lora_figures["perplexity"] == pytest.approx(merged_figures["perplexity"], rel=1e-5)


def test_score_from_lora_run_equals_merged_run(merged, base_run):
    workdir, out, _, _ = merged
    contexts, choices = ["<|user|>\nup kappa\n"] * 3, ["KAPPA", " kappa", "SIGMA"]
    scores = {}
    for name, run in (("lora", workdir), ("merged", out), ("base", base_run[0])):
        gen, tokenizer, _ = generate.load(run)
        scores[name] = score(gen.model, tokenizer, contexts, choices)
    for (got, got_greedy), (want, want_greedy) in zip(scores["lora"], scores["merged"]):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6) and got_greedy == want_greedy
    assert max(abs(a[0] - b[0]) for a, b in zip(scores["lora"], scores["base"])) > 1e-3


def test_a_changed_or_missing_base_is_refused(lora_run, tmp_path, capsys):
    workdir, _, cfg = lora_run
    other = tmp_path / "other_base"  # same shapes, other values: not the trained-on base
    run_fixture.write_run(other, run_fixture.tiny_run_config(str(tmp_path / "tfds")), seed=4)
    argv = ["generate", "--workdir", str(workdir), "--prompt", "up", "--max-new-tokens", "2"]
    assert cli.main(argv + [f"--config.finetune.base={other}/checkpoints/1"]) == 2
    err = capsys.readouterr().err
    assert "does not match the one the run was trained on" in err and str(other) in err, err
    assert cli.main(argv + [f"--config.finetune.base={tmp_path / 'gone'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "gone" in err and len(err.strip().splitlines()) == 1, err
