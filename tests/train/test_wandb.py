"""Weights & Biases logging in offline mode (no network): the W&B run holds exactly the
rows of metrics.jsonl, and a resumed jaxlm run continues the same W&B run. The offline
file is read back with W&B's own record format (LevelDB-style log of protobuf records),
not with anything jaxlm wrote."""

import json
import shutil
import struct

import pytest

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.train import loop
from jaxlm.train.lm import CausalLM

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, HEADER = 32768, 7  # the log's block size; its file header and record header sizes


def history(path) -> list[dict]:
    """The history rows of an offline W&B run file."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:HEADER]) == (b":W&B", 0xBEE1, 0)
    chunks, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):  # FULL, LAST
            chunks.append(pending + chunk)
            pending = b""
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk
    rows = []
    for raw in chunks:
        record = wandb_pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def offline_runs(workdir):
    return sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_offline_wandb_logs_the_rows_of_metrics_jsonl_and_resumes_the_same_run(
        run_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"

    def config(steps):
        cfg = run_config(steps=steps, every=2)
        cfg.train.allow_config_change = True  # the resume below runs longer
        cfg.metrics.update(wandb=True, wandb_mode="offline", wandb_project="jaxlm-test")
        return cfg

    loop.train(CausalLM(config(3)), workdir)
    shutil.rmtree(workdir / "checkpoints" / "3")  # interrupted before step 3 was saved
    loop.train(CausalLM(config(5)), workdir)  # resumes from step 2: W&B has step 3 already

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first, second = (history(p) for p in offline_runs(workdir))
    run_id = json.loads((workdir / "wandb_run.json").read_text())["id"]
    assert [p.name for p in offline_runs(workdir)] == [f"run-{run_id}.wandb"] * 2
    assert [r["_step"] for r in first] == [1, 2, 3]
    assert [r["_step"] for r in second] == [3, 4, 5]
    logged = {r["_step"]: r for r in first[:2] + second}  # the resume superseded step 3
    assert [r["step"] for r in rows] == sorted(logged)
    for row in rows:
        wandb_row = logged[row["step"]]
        assert {k: wandb_row[k] for k in row if k != "step"} == \
            {k: v for k, v in row.items() if k != "step"}


def test_wandb_settings_are_checked_with_the_config():
    cfg = config_lib.defaults()
    cfg.metrics.update(wandb=True, wandb_mode="cloud")
    with pytest.raises(ConfigError, match=r"config.metrics.wandb_mode: 'cloud' not in "):
        config_lib.validate(cfg, 1)


def test_a_run_from_step_0_gets_a_new_wandb_run(tmp_path):
    """The id is kept across resumes; a start from step 0 (a first attempt that never
    saved, on_all_corrupt=restart) must not continue the old W&B run, whose steps it would
    otherwise never log."""
    from jaxlm.train import wandb_writer
    first = wandb_writer.run_id(tmp_path, fresh=True)
    assert wandb_writer.run_id(tmp_path, fresh=False) == first
    again = wandb_writer.run_id(tmp_path, fresh=True)
    assert again != first
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {"id": again}


def test_wandb_without_the_package_is_refused_before_the_run_starts(monkeypatch):
    from jaxlm.train import wandb_writer
    cfg = config_lib.defaults()
    cfg.metrics.wandb = True
    monkeypatch.setattr(wandb_writer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r'config.metrics.wandb: true needs the wandb package'):
        wandb_writer.check_installed(cfg.metrics)
    config_lib.validate(cfg, 1)  # reading a run that logged to W&B needs no wandb
