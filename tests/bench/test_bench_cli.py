"""`jaxlm bench` refuses a number of rounds it cannot take a median of, before anything runs."""

import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)


def test_rounds_below_one_are_refused(tmp_path):
    done = run_fixture.jaxlm_cli("bench", "generate", "--rounds", "0", cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "jaxlm: --rounds: must be at least 1, got 0\n"
