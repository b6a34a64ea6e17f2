"""Bad input to a training command is one line and exit 2, before anything starts."""

import subprocess
import sys


def jaxlm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_a_config_file_with_a_syntax_error(tmp_path):
    config = tmp_path / "mine.py"
    config.write_text("from jaxlm.config import defaults\n\ndef get_config(:\n    return defaults()\n")
    done = jaxlm("train", "--config", str(config), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"jaxlm: {config}:3: SyntaxError: invalid syntax\n"
    assert not (tmp_path / "w").exists()


def test_an_unwritable_workdir(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / "file" / "run"
    done = jaxlm("train", "--workdir", str(workdir), "--config.train.steps=1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (f"jaxlm: workdir {workdir} is not writable: [Errno 20] Not a "
                           f"directory: '{workdir}'\n")
