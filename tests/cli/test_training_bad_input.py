"""Bad input to a training command is one line and exit 2, before anything starts."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)


def test_a_config_file_with_a_syntax_error(tmp_path):
    config = tmp_path / "mine.py"
    config.write_text("from jaxlm.config import defaults\n\ndef get_config(:\n    return defaults()\n")
    done = run_fixture.jaxlm_cli("train", "--config", config, "--workdir", tmp_path / "w",
                                 cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"jaxlm: {config}:3: SyntaxError: invalid syntax\n"
    assert not (tmp_path / "w").exists()


def test_an_unwritable_workdir(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / "file" / "run"
    done = run_fixture.jaxlm_cli("train", "--workdir", workdir, "--config.train.steps=1",
                                 cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (f"jaxlm: workdir {workdir} is not writable: [Errno 20] Not a "
                           f"directory: '{workdir}'\n")


def test_a_read_only_metrics_file_is_refused_before_anything_starts(tmp_path):
    """Found writable on the surface (the lock could be written) but not what a resumed run
    appends to: refused before compiling, not a PermissionError traceback at the first write."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    metrics = workdir / "metrics.jsonl"
    metrics.write_text('{"step": 5, "loss": 3.0}\n')
    metrics.chmod(0o444)
    command = [sys.executable, "-m", "jaxlm.cli", "train", "--workdir", str(workdir),
               "--config.train.steps=1"]
    if os.geteuid() == 0:  # root writes anywhere unless it drops the capability
        if shutil.which("capsh") is None:
            pytest.skip("running as root without capsh: a read-only file is writable")
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
                   shlex.join(command)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (f"jaxlm: workdir {workdir} is not writable: [Errno 13] Permission "
                           f"denied: '{metrics}'\n")
    assert sorted(p.name for p in workdir.iterdir()) == ["metrics.jsonl"]


def test_a_training_command_leaves_no_start_up_signal_handler_behind(capsys):
    """Once `jaxlm train` has returned (here at once, on bad flags), a signal is no longer a
    "preempted during start-up" exit 75: the default handlers are back."""
    import signal

    from jaxlm import cli
    assert cli.main(["train", "--coordinator", "h:1", "--num-processes", "2"]) == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
