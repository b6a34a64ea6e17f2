"""What a resume may change, checked before the resumed run writes anything; one row per
step in metrics.jsonl; a run keeps its tokenizer (jaxlm.train.compat, jaxlm.train.loop)."""

import json

import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm import errors
from jaxlm.checkpoint import rundir
from jaxlm.data import tokenizers
from jaxlm.train import compat, loop
from jaxlm.train.lm import CausalLM


@pytest.fixture
def run_of_two_steps(run_config, tmp_path):
    def make(**changes):
        cfg = run_config(steps=2, every=2, seq_len=64, warmup_steps=1)
        for key, value in changes.items():
            section, leaf = key.split(".")
            cfg[section][leaf] = value
        return cfg
    workdir = tmp_path / "run"
    loop.train(CausalLM(make()), workdir)
    return make, workdir


@pytest.mark.parametrize("changes,rows", [
    ({"model.d_ff": 128}, [("model.d_ff", 192, 128)]),
    ({"data.global_batch_size": 8, "train.seed": 3},
     [("data.global_batch_size", 16, 8), ("train.seed", 0, 3)]),
])
def test_model_and_data_order_keys_are_refused_before_anything_is_written(
        run_of_two_steps, changes, rows):
    make, workdir = run_of_two_steps
    before = run_fixture.snapshot(workdir)
    cfg = make(**changes, **{"train.steps": 4, "train.allow_config_change": True})
    with pytest.raises(compat.ResumeConfigError) as refused:
        loop.train(CausalLM(cfg), workdir)
    assert str(refused.value) == (
        f"cannot resume {workdir / 'checkpoints' / '2'}: the run was saved with other values "
        f"of settings that fix the model or the order of its data:\n"
        f"{compat.table(rows)}\nrun with the saved values, or start a new run in another "
        f"--workdir")
    assert errors.exit_code(refused.value) == errors.BAD_INPUT
    assert run_fixture.snapshot(workdir) == before


def test_optimizer_changes_need_permission_then_are_printed_and_recorded(
        run_of_two_steps, capsys):
    make, workdir = run_of_two_steps
    before = run_fixture.snapshot(workdir)
    with pytest.raises(compat.ResumeConfigError, match=r"(?s)with other optimizer or schedule "
                       r"settings.*config.optim.learning_rate  0.01   0.002\n"
                       r".*add --config.train.allow_config_change=true"):
        loop.train(CausalLM(make(**{"optim.learning_rate": 2e-3, "train.steps": 3})), workdir)
    assert run_fixture.snapshot(workdir) == before

    capsys.readouterr()
    cfg = make(**{"optim.learning_rate": 2e-3, "train.steps": 3,
                  "train.allow_config_change": True, "checkpoint.every": 1})
    logged = loop.train(CausalLM(cfg), workdir)
    assert [m["step"] for m in logged] == [3]
    out = capsys.readouterr().out
    assert "resuming with changed settings (train.allow_config_change):\n" + compat.table(
        [("optim.learning_rate", 0.01, 0.002), ("train.steps", 2, 3)]) in out
    metadata = rundir.read_metadata(workdir / "checkpoints" / "3")
    assert metadata["config_changes"] == [
        {"step": 2, "key": "optim.learning_rate", "saved": 0.01, "now": 0.002},
        {"step": 2, "key": "train.steps", "saved": 2, "now": 3}]


def test_free_keys_change_without_a_word(run_of_two_steps, capsys):
    make, workdir = run_of_two_steps
    cfg = make(**{"train.log_every": 2, "checkpoint.keep": 5, "metrics.peak_flops": 2e11})
    cfg.mesh.update(data=2, fsdp=4)
    cfg.train.steps = 2  # nothing left to train: resumes and ends
    assert loop.train(CausalLM(cfg), workdir) == []
    assert "changed settings" not in capsys.readouterr().out


def test_a_run_keeps_its_tokenizer(run_config, tmp_path):
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)]
    model = tmp_path / "sp.model"
    tokenizers.train_sentencepiece(texts, model, vocab_size=300)
    cfg = run_config(steps=2, every=2, seq_len=64, warmup_steps=1)
    cfg.data.update(tokenizer="sentencepiece", tokenizer_path=str(model))
    workdir = tmp_path / "run"
    loop.train(CausalLM(cfg), workdir)
    saved = tokenizers.load_saved(workdir / "tokenizer")

    # Same config, another model file at the same path (the config cannot tell).
    tokenizers.train_sentencepiece([t.upper() for t in texts], model, vocab_size=300)
    other = tokenizers.load_tokenizer(cfg.data)
    assert other.fingerprint != saved.fingerprint
    before = run_fixture.snapshot(workdir)
    cfg.train.update(steps=4, allow_config_change=True)
    with pytest.raises(loop.TokenizerMismatchError) as refused:
        loop.train(CausalLM(cfg), workdir)
    assert str(refused.value) == (
        f"cannot resume {workdir}: it was trained with the tokenizer in {workdir / 'tokenizer'} "
        f"(sentencepiece, 300 ids, model sha256 {saved.fingerprint[:12]}); this config's is "
        f"sentencepiece, 300 ids, model sha256 {other.fingerprint[:12]}. A run keeps its "
        f"tokenizer: use the same one, or another --workdir")
    assert run_fixture.snapshot(workdir) == before


def test_a_fresh_start_supersedes_an_earlier_attempts_rows(run_config, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "lo')  # torn
    loop.train(CausalLM(run_config(steps=2, every=2, seq_len=64, warmup_steps=1)), workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0
    old = (workdir / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in old] == [
        {"step": 1, "loss": 9.0, "superseded_by_resume_from": 0},
        {"step": 2, "loss": 8.0, "superseded_by_resume_from": 0},
        {"unparsed": '{"step": 3, "lo', "superseded_by_resume_from": 0}]
