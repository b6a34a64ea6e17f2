"""`jaxlm bench` refuses a number of rounds it cannot take a median of, before anything runs."""

import subprocess
import sys


def test_rounds_below_one_are_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jaxlm.cli", "bench", "generate", "--rounds", "0"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "jaxlm: --rounds: must be at least 1, got 0\n"
