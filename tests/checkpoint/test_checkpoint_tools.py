"""`jaxlm checkpoint ls|inspect|export-params` on a real (tiny) run: what they report matches
what the checkpoint holds, an export restores to exactly the cast parameters, and bad paths
exit with status 2 naming the path."""

import json
import os
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.checkpoint import export
from jaxlm.checkpoint import inspect as tools
from jaxlm.train import loop
from jaxlm.train.lm import CausalLM

CONFIG_DIR = pathlib.Path(__file__).parents[2] / "configs"
STEPS = 3


@pytest.fixture(scope="module")
def run_dir(stdlib_data_dir, tmp_path_factory):
    """A 3-step run with a checkpoint at every step; tests that change it work on a copy."""
    cfg = config_lib.load_config_file(CONFIG_DIR / "tiny.py")
    cfg.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=64)
    cfg.data.update(data_dir=stdlib_data_dir, seq_len=64, global_batch_size=8)
    cfg.train.update(steps=STEPS, log_every=1)
    cfg.checkpoint.update(every=1, keep=10)
    cfg.metrics.update(peak_flops=1e11, tensorboard=False)
    workdir = tmp_path_factory.mktemp("ckpt_tools") / "run"
    loop.train(CausalLM(cfg), workdir)
    return workdir


@pytest.fixture(scope="module")
def saved(run_dir):
    """The latest step's state and run metadata as Orbax restores them, arrays on the host."""
    step_dir = run_dir / "checkpoints" / str(STEPS)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(step_dir / "state")
    metadata = json.loads((step_dir / "metadata" / "metadata").read_text())
    return jax.tree.map(np.asarray, state), metadata


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_json(tree, prefix=""):
    """(name, list) pairs of a nested dict whose leaves are lists."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flat_json(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def run_cli(*args):
    return run_fixture.jaxlm_cli(*args, timeout=300)


# ---- ls ---------------------------------------------------------------------------------

def test_ls_lists_finalized_steps_marks_latest_and_ignores_incomplete(run_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    fake = workdir / "checkpoints" / f"{STEPS + 1}.orbax-checkpoint-tmp-1234567890"
    (fake / "state").mkdir(parents=True)
    (fake / "state" / "partial").write_bytes(b"\0" * 100)

    listing = tools.list_checkpoints(workdir)
    assert [e.step for e in listing.steps] == list(range(1, STEPS + 1))
    assert all(e.nbytes > 0 for e in listing.steps)
    assert [e.latest for e in listing.steps] == [False] * (STEPS - 1) + [True]
    assert listing.latest == STEPS
    assert all(e.missing == () for e in listing.steps)
    assert [e.name for e in listing.incomplete] == [fake.name]
    assert listing.incomplete[0].nbytes == 100
    assert listing.other == []

    for arg in (workdir, workdir / "checkpoints"):  # either spelling of the run
        assert cli.main(["checkpoint", "ls", str(arg)]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        step_lines = {int(line.split()[0]): line for line in lines if line.split()[0].isdigit()}
        assert sorted(step_lines) == list(range(1, STEPS + 1))
        assert step_lines[STEPS].rstrip().endswith("latest")
        assert not any("latest" in step_lines[s] for s in range(1, STEPS))
        assert all("iB" in line and "ago" in line for line in step_lines.values())
        incomplete_at = lines.index("incomplete (ignored):")
        assert fake.name in lines[incomplete_at + 1]
        assert fake.name not in "\n".join(lines[:incomplete_at])


def test_human_readable_figures():
    assert tools.format_bytes(512) == "512 B"
    assert tools.format_bytes(1536) == "1.5 KiB"
    assert tools.format_bytes(12.3 * 2**20) == "12.3 MiB"
    assert tools.format_bytes(3 * 2**30) == "3.0 GiB"
    assert tools.format_age(5) == "5s ago"
    assert tools.format_age(300) == "5m ago"
    assert tools.format_age(2 * 3600 + 5) == "2h ago"
    assert tools.format_age(3 * 86400) == "3d ago"


# ---- inspect ----------------------------------------------------------------------------

def test_inspect_reports_every_parameter_from_metadata(run_dir, saved, capsys):
    state, metadata = saved
    model = metadata["config"]["model"]
    info = tools.inspect_checkpoint(run_dir)
    assert info["step"] == STEPS
    assert info["jaxlm_version"] == metadata["jaxlm_version"]
    assert info["tokenizer"] == metadata["tokenizer"] == "byte"
    assert info["config"] == metadata["config"]
    assert info["layout"] == {"scan_layers": True}
    assert info["data_state_version"] == json.loads(
        (run_dir / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())["version"]

    params = flat(state["params"])
    axes = {name: tuple(names) for name, names in flat_json(metadata["layout"]["param_axes"])}
    table = {p.name: p for p in info["params"]}
    assert sorted(table) == sorted(params)
    for name, array in params.items():
        entry = table[name]
        assert entry.shape == array.shape, name
        assert entry.dtype == array.dtype.name, name
        assert entry.axes == axes[name] and len(entry.axes) == array.ndim, name
        assert entry.size == array.size and entry.nbytes == array.nbytes, name
    head_dim = model["d_model"] // model["n_heads"]
    assert table["embed"].shape == (model["vocab_size"], model["d_model"])
    assert table["embed"].axes == ("vocab", "embed")
    assert table["blocks/attn/wq"].shape == (model["n_layers"], model["d_model"], model["n_heads"],
                                             head_dim)
    assert table["blocks/mlp/w_up"].shape == (model["n_layers"], model["d_model"], model["d_ff"])
    assert info["param_count"] == sum(a.size for a in params.values())

    opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if hasattr(x, "nbytes")]
    assert info["opt_state"] == {"leaves": len(opt_leaves),
                                 "bytes": sum(x.nbytes for x in opt_leaves)}
    assert info["opt_state"]["bytes"] >= 2 * info["param_bytes"]  # AdamW: mu and nu

    assert cli.main(["checkpoint", "inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"jaxlm version {metadata['jaxlm_version']}" in out
    assert "tokenizer     byte" in out and "scan_layers=True" in out
    assert '"d_model": 64' in out  # the config
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name, array in params.items():
        assert str(array.shape) in rows[name] and array.dtype.name in rows[name], name
        assert "(" + ", ".join(axes[name]) + ")" in rows[name], name
    assert f"optimizer state: {len(opt_leaves)} arrays" in out
    assert f"data iterator state version {info['data_state_version']}" in out

    assert cli.main(["checkpoint", "inspect", str(run_dir), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert {p["name"]: tuple(p["shape"]) for p in as_json["params"]} == \
        {n: a.shape for n, a in params.items()}


def test_inspect_accepts_the_run_its_checkpoints_or_one_step(run_dir):
    checkpoints = run_dir / "checkpoints"
    assert tools.inspect_checkpoint(checkpoints)["step"] == STEPS
    assert tools.inspect_checkpoint(checkpoints / "1")["step"] == 1
    assert tools.inspect_checkpoint(run_dir, step=2)["path"] == str(checkpoints / "2")


# ---- export-params ----------------------------------------------------------------------

def test_export_bfloat16_round_trips_exactly_without_optimizer_state(run_dir, saved, tmp_path,
                                                                     capsys):
    state, metadata = saved
    out = tmp_path / "export"
    assert cli.main(["checkpoint", "export-params", str(run_dir), "--out", str(out),
                     "--dtype", "bfloat16"]) == 0
    assert str(out) in capsys.readouterr().out

    # Restored with plain Orbax, from the export's own metadata.
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(out).item_metadata.tree
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        restored = checkpointer.restore(out, jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree))
    expected = flat(jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), state["params"]))
    got = flat(restored)
    assert sorted(got) == sorted(expected)  # the parameters, and nothing else
    for name, value in got.items():
        assert value.dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(np.asarray(value).view(np.uint16),
                                      expected[name].view(np.uint16), err_msg=name)
    names = "\n".join(str(k) for k in flat(tree))
    assert "opt_state" not in names and "mu" not in names.split("/") and "step" not in flat(tree)

    info = json.loads((out / export.EXPORT_INFO_FILE).read_text())
    assert info["dtype"] == "bfloat16"
    assert info["source"]["step"] == STEPS
    assert info["config"] == metadata["config"]
    assert info["layout"] == metadata["layout"]
    assert info["tokenizer"] == "byte"
    assert info["param_count"] == sum(x.size for x in expected.values())
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == \
        sorted(p.name for p in (run_dir / "tokenizer").iterdir())

    # The loader returns the same arrays; the export is half the float32 parameters' bytes.
    loaded, loaded_info = export.load_exported_params(out)
    assert loaded_info == info
    for name, value in flat(loaded).items():
        np.testing.assert_array_equal(np.asarray(value).view(np.uint16),
                                      expected[name].view(np.uint16), err_msg=name)
    assert info["param_bytes"] * 2 == sum(x.nbytes for x in flat(state["params"]).values())


def test_export_of_an_earlier_step_in_float32_equals_it(run_dir, tmp_path):
    step_dir = run_dir / "checkpoints" / "1"
    info = export.export_params(step_dir, tmp_path / "out", "float32")
    assert info["source"]["step"] == 1
    with ocp.StandardCheckpointer() as checkpointer:
        original = checkpointer.restore(step_dir / "state")["params"]
    loaded, _ = export.load_exported_params(tmp_path / "out")
    for name, value in flat(original).items():
        assert flat(loaded)[name].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(flat(loaded)[name]), np.asarray(value),
                                      err_msg=name)


def test_export_refuses_an_existing_output(run_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("keep me")
    assert cli.main(["checkpoint", "export-params", str(run_dir), "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert (out / "file").read_text() == "keep me"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["checkpoint", "export-params", str(run_dir), "--out", str(tmp_path / "x"),
                  "--dtype", "int8"])
    assert exit_info.value.code == 2


# ---- bad paths --------------------------------------------------------------------------

def test_bad_paths_exit_2_naming_the_path(run_dir, tmp_path):
    """As a user runs it: no config is needed, even with no default config around."""
    no_checkpoints = tmp_path / "not_a_run"
    no_checkpoints.mkdir()
    result = run_cli("checkpoint", "ls", no_checkpoints)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(no_checkpoints / "checkpoints") in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli("checkpoint", "inspect", tmp_path / "missing")
    assert result.returncode == 2 and str(tmp_path / "missing") in result.stderr

    result = run_cli("checkpoint", "ls", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "latest" in result.stdout


def test_missing_or_unfinished_steps_exit_2(run_dir, tmp_path, capsys):
    checkpoints = run_dir / "checkpoints"
    for argv, named in (
            (["inspect", str(checkpoints / "99")], checkpoints / "99"),
            (["inspect", str(run_dir), "--step", "99"], checkpoints / "99"),
            (["export-params", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
             tmp_path / "nowhere")):
        assert cli.main(["checkpoint", *argv]) == 2, argv
        assert str(named) in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()

    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    assert cli.main(["checkpoint", "inspect", str(empty)]) == 2
    assert f"no finalized checkpoint in {empty / 'checkpoints'}" in capsys.readouterr().err
    assert cli.main(["checkpoint", "ls", str(empty)]) == 0
    assert "no finalized checkpoints" in capsys.readouterr().out

    # An interrupted save is not a step, even when named directly.
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    os.rename(workdir / "checkpoints" / str(STEPS),
              workdir / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1")
    assert tools.inspect_checkpoint(workdir)["step"] == STEPS - 1
    assert cli.main(["checkpoint", "inspect",
                     str(workdir / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1")]) == 2
    capsys.readouterr()


def test_checkpoint_verb_rejects_config_overrides(run_dir, capsys):
    assert cli.main(["checkpoint", "ls", str(run_dir), "--config.train.steps=5"]) == 2
    assert "config overrides" in capsys.readouterr().err


def test_a_read_only_look_at_a_run_is_no_barrier_between_processes(run_dir, monkeypatch):
    """Reading a run's steps (the resume check, ls, inspect) may happen on one process only,
    or on each at its own moment: it must never wait for the others. (A read-only Orbax
    manager wrote root metadata behind a barrier: in a 2-process run whose processes looked
    at checkpoints/ before and after process 0 created it, the barriers mismatched.)"""
    from orbax.checkpoint._src.multihost import multihost

    from jaxlm.checkpoint import rundir

    def barrier(*args, **kwargs):
        raise AssertionError(f"a read-only look waited for the other processes: {args}")

    monkeypatch.setattr(multihost, "sync_global_processes", barrier)
    assert rundir.finalized_steps(run_dir / "checkpoints") == sorted(
        (int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()),
        reverse=True)
