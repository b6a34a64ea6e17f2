"""`jaxlm bench step` runs the encoder (bert) and encoder-decoder (t5) benchmark configs at a
tiny size, in-process through the command line, and prints their figures' rows; `--family`
belongs to `jaxlm bench generate` only. No timing is asserted: speed is what the benchmarks
measure. (The FLOP count they divide by: test_bench_flops.py; `jaxlm bench generate --family
t5`: test_bench_generate.py.)
"""

from __future__ import annotations

import re

import pytest
from test_bench_flops import TINY_BERT, TINY_T5

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.model import zoo
from jaxlm.train import pretraining, seq2seq

# ---- the command line, at a tiny size ---------------------------------------------------------

def table_rows(text: str) -> dict[str, str]:
    """A benchmark table's rows: name -> value (split at the first run of two or more
    spaces); a name printed twice keeps its first value."""
    rows = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2:
            rows.setdefault(parts[0], parts[1])
    return rows


@pytest.mark.parametrize("config,tiny,family,objective", [
    ("bench_cpu_bert.py", TINY_BERT, "bert", "masked_lm"),
    ("bench_cpu_t5.py", TINY_T5, "t5", "span_corruption")])
def test_bench_step_runs_the_family_config_and_prints_its_figures(capsys, config, tiny, family,
                                                                  objective):
    code = cli.main(["bench", "step", "--config", f"configs/{config}", "--steps", "2", *tiny])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table_rows(out)
    assert rows["config"].startswith(f"{family} d=24 ")
    assert f"objective={objective}" in rows["config"] and "remat=save_matmuls" in rows["config"]
    task = pretraining.task(config_lib.load(f"configs/{config}", tiny))
    assert rows["parameters"] == f"{zoo.param_count(task.cfg.model):,}"
    assert rows["model FLOPs per token"] == f"{task.flops_per_token():,.0f} FLOP"
    assert re.fullmatch(r"median [\d.]+ ms \(min [\d.]+, max [\d.]+, n=2\)", rows["step time"])
    for name in ("tokens/s", "model FLOP/s", "peak (measured float32 matmul)", "MFU",
                 "matmul between steps", "MFU per round vs that matmul", "final loss",
                 "host load"):
        assert name in rows, out
    if family == "t5":
        assert "L=1+2 (encoder+decoder)" in rows["config"]
        assert f"targets={seq2seq.targets_len(task.cfg)}" in rows["config"]
        assert rows["tokens/s"].endswith("(encoder inputs)") and "target tokens/s" in rows


def test_family_is_refused_outside_bench_generate(capsys):
    code = cli.main(["bench", "step", "--family", "t5", "--config", "configs/bench_cpu_t5.py"])
    assert code == 2
    assert capsys.readouterr().err == ("jaxlm: --family: only `jaxlm bench generate` takes it, "
                                       "not `jaxlm bench step`\n")
