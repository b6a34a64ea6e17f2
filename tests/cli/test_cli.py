"""`jaxlm train` as a user runs it: a subprocess that writes metrics, TensorBoard events and
checkpoints, and resumes when run again."""

import json
import pathlib

import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

REPO = pathlib.Path(__file__).parents[2]


def run_cli(*args, cwd):
    return run_fixture.jaxlm_cli(*args, cwd=cwd)


def small_args(data_dir, workdir, steps):
    return ["train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.train.steps={steps}",
            "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=192",
            "--config.data.seq_len=64", "--config.data.global_batch_size=8",
            "--config.train.log_every=1", "--config.checkpoint.every=2",
            "--config.metrics.peak_flops=1e11"]


def test_train_writes_metrics_events_checkpoints_and_resumes(stdlib_data_dir, tmp_path):
    workdir = tmp_path / "run"
    first = run_cli(*small_args(stdlib_data_dir, workdir, steps=3), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "resumed" not in first.stdout

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s", "mfu"):
        assert all(key in r for r in records), key
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]

    longer = small_args(stdlib_data_dir, workdir, steps=5)
    refused = run_cli(*longer, cwd=tmp_path)  # train.steps is the schedule's: not silently
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].startswith(
        "to resume with the new values, add --config.train.allow_config_change=true")
    second = run_cli(*longer, "--config.train.allow_config_change=true", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / '3'}" in second.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert "5" in {p.name for p in (workdir / "checkpoints").iterdir()}


def test_bad_config_value_fails_fast_with_the_key(tmp_path):
    result = run_cli("train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir",
                     str(tmp_path / "w"), "--config.data.seq_len=4096", cwd=tmp_path)
    assert result.returncode == 2
    assert "config.data.seq_len" in result.stderr and "max_seq_len" in result.stderr
    assert not (tmp_path / "w").exists()  # nothing was started


def test_unknown_override_key(tmp_path):
    result = run_cli("train", "--config.optim.lr=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown config key: config.optim.lr" in result.stderr


def test_sentencepiece_end_to_end(stdlib_data_dir, tmp_path):
    """Train a tokenizer on the default corpus, then pretrain with it: the embedding takes
    the tokenizer's vocabulary padded to 128, and the run keeps its tokenizer."""
    model = tmp_path / "sp.model"
    trained = run_cli("tokenizer", "train", "--config", str(REPO / "configs" / "tiny.py"),
                      f"--config.data.data_dir={stdlib_data_dir}", "--vocab-size", "500",
                      "--out", str(model), "--max-documents", "60", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    workdir = tmp_path / "run"
    args = small_args(stdlib_data_dir, workdir, steps=2) + [
        "--config.data.tokenizer=sentencepiece", f"--config.data.tokenizer_path={model}",
        "--config.model.vocab_size=0"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((workdir / "tokenizer" / "jaxlm_tokenizer.json").read_text())
    assert meta["vocab_size"] == 500
    from jaxlm.data import tokenizers
    saved = tokenizers.load_saved(workdir / "tokenizer")
    assert saved.decode(saved.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.9 < record["packing_efficiency"] <= 1.0 and record["data_tokens"] > 0
    # 500 ids padded to a multiple of 128: the checkpoint's embedding has 512 rows.
    checkpoint_meta = json.loads((workdir / "checkpoints" / "2" / "metadata" / "metadata").read_text())
    assert checkpoint_meta["config"]["model"]["vocab_size"] == 512


def test_source_glob_matching_nothing_fails_fast_naming_it(tmp_path):
    config = tmp_path / "mine.py"
    config.write_text(
        "import ml_collections\n"
        "from jaxlm.config import defaults\n\n"
        "def get_config():\n"
        "    cfg = defaults()\n"
        "    cfg.data.sources.mine = ml_collections.ConfigDict(dict(kind='text', paths='/nonexistent/*.txt'))\n"
        "    cfg.data.dataset = 'mine'\n"
        "    return cfg\n")
    result = run_cli("train", "--config", str(config), "--workdir", str(tmp_path / "w"),
                     f"--config.data.data_dir={tmp_path / 'tfds'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "/nonexistent/*.txt" in result.stderr and "mine" in result.stderr
    assert "Traceback" not in result.stderr
