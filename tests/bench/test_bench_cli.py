"""`jaxlm bench` refuses a number of rounds it cannot take a median of, and a --workdir where
it does not belong (bench quant needs one), before anything runs."""

import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)


def test_rounds_below_one_are_refused(tmp_path):
    done = run_fixture.jaxlm_cli("bench", "generate", "--rounds", "0", cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "jaxlm: --rounds: must be at least 1, got 0\n"


def test_workdir_and_runs_are_for_the_run_benchmarks_only(capsys):
    from jaxlm import cli
    for argv, says in ((["bench", "quant"], "--workdir: `jaxlm bench quant`, `compress` and "
                                            "`lm-eval` need it"),
                       (["bench", "lm-eval"], "--workdir: `jaxlm bench quant`, `compress` and "
                                              "`lm-eval` need it"),
                       (["bench", "step", "--workdir", "runs/x"], "no other benchmark takes it"),
                       (["bench", "compress", "--workdir", "runs/x"], "--runs: `jaxlm bench "
                                                                      "compress` needs it"),
                       (["bench", "quant", "--workdir", "runs/x", "--runs", "a=b"],
                        "--runs: `jaxlm bench compress` needs it (NAME=RUN,...); no other")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, (argv, err)
