"""`jaxlm bench` refuses a number of rounds it cannot take a median of, and a --workdir where
it does not belong (bench quant needs one), before anything runs."""

import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)


def test_rounds_below_one_are_refused(tmp_path):
    done = run_fixture.jaxlm_cli("bench", "generate", "--rounds", "0", cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "jaxlm: --rounds: must be at least 1, got 0\n"


def test_workdir_is_for_bench_quant_only(capsys):
    from jaxlm import cli
    assert cli.main(["bench", "quant"]) == 2
    assert "--workdir: `jaxlm bench quant` needs it" in capsys.readouterr().err
    assert cli.main(["bench", "step", "--workdir", "runs/x"]) == 2
    assert "no other benchmark takes it" in capsys.readouterr().err
