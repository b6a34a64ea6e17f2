"""`jaxlm config show`: the config a command would run (a config file with overrides, or a
run's saved config), validated as `jaxlm train` validates it, printed as YAML or JSON."""

import json
import pathlib

import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
import yaml

from jaxlm import config as config_lib

REPO = pathlib.Path(__file__).parents[2]
TINY = REPO / "configs" / "tiny.py"
OVERRIDES = ["--config.train.steps=7", "--config.optim.learning_rate=3e-4",
             "--config.model.n_layers=3"]


def config_show(*args):
    return run_fixture.jaxlm_cli("config", "show", *args, timeout=120)


def expected(cfg) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))


def test_file_with_overrides_as_json_and_yaml():
    want = expected(config_lib.load(TINY, OVERRIDES))
    as_json = config_show("--config", str(TINY), *OVERRIDES, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == want
    assert want["train"]["steps"] == 7 and want["model"]["n_layers"] == 3
    # Without --config: configs/tiny.py, as `jaxlm train`; YAML by default.
    as_yaml = config_show(*OVERRIDES, "--num-devices", "8")
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == want


@pytest.mark.parametrize("override, message", [
    ("--config.train.steps=ten", "jaxlm: config.train.steps: expected an integer, got 'ten'"),
    ("--config.trian.steps=1", "jaxlm: unknown config key: config.trian"),
    # Parsed fine, refused by the validation `jaxlm train` applies:
    ("--config.data.seq_len=4096", ("jaxlm: config.data.seq_len: 4096 is longer than the "
                                    "model's positions (model.max_seq_len=1024)")),
])
def test_bad_value_is_exit_2_with_one_line(override, message):
    result = config_show("--config", str(TINY), override, "--num-devices", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message] and result.stdout == ""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run directory as `jaxlm train` leaves it (tests/run_fixture.py, no training)."""
    workdir = tmp_path_factory.mktemp("run")
    run_fixture.write_run(workdir, run_fixture.tiny_run_config(str(workdir / "tfds")), step=3)
    return workdir


def test_workdir_shows_the_saved_config_with_overrides(run_dir):
    from jaxlm.checkpoint import rundir
    saved, _ = rundir.saved_config(run_dir)
    plain = config_show("--workdir", str(run_dir), "--json")
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout) == expected(saved)
    assert json.loads(plain.stdout)["model"]["d_model"] == 32  # the run's, not tiny.py's 256

    overridden = config_show("--workdir", str(run_dir), "--config.train.steps=9",
                             "--step", "3")
    assert overridden.returncode == 0, overridden.stderr
    config_lib.apply_overrides(saved, ["--config.train.steps=9"])
    assert yaml.safe_load(overridden.stdout) == expected(saved)

    missing = config_show("--workdir", str(run_dir), "--step", "4")
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
