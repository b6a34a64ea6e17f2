"""jaxlm.console: what native code and libraries print is held back unless --verbose, and
shown after all when the step that printed it fails. Subprocesses: file descriptors are
what is tested."""

import os
import subprocess
import sys

import pytest

PROGRAMS = {
    # Native stdout (Gloo's notes) dropped for good; Python's prints still shown.
    "stdout": "console.drop_native_stdout(); os.write(1, b'native\\n'); print('python')",
    # Native stderr of a block held back; Python's stderr writes inside it still shown.
    "block": ("with console.native_output_held():\n"
              "    os.write(2, b'native\\n'); print('python', file=sys.stderr)"),
    # A block that fails shows what it held back, then the error.
    "failing": ("with console.native_output_held():\n"
                "    os.write(2, b'native\\n'); raise SystemExit(3)"),
    # Python-level prints and progress bars of a block (TFDS's) held back.
    "python": "with console.python_output_held():\n    print('chatter'); print('bar', file=sys.stderr)",
}


def run(program: str, verbose: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "JAXLM_VERBOSE"}
    if verbose:
        env["JAXLM_VERBOSE"] = "1"
    code = "import os, sys\nfrom jaxlm import console\n" + PROGRAMS[program]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("program, out, err, code", [
    ("stdout", "python\n", "", 0),
    ("block", "", "python\n", 0),
    ("failing", "", "native\n", 3),
    ("python", "", "", 0),
])
def test_library_output_is_held_back(program, out, err, code):
    done = run(program, verbose=False)
    assert (done.stdout, done.stderr, done.returncode) == (out, err, code)


@pytest.mark.parametrize("program, out, err", [
    ("stdout", "native\npython\n", ""),
    ("block", "", "native\npython\n"),
    ("python", "chatter\n", "bar\n"),
])
def test_verbose_shows_everything(program, out, err):
    done = run(program, verbose=True)
    assert (done.stdout, done.stderr) == (out, err)
