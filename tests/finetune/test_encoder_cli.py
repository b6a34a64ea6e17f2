"""`jaxlm finetune --config configs/qa_tiny.py` and `configs/translate_tiny.py` end to end, as a
user types them (a subprocess each), on tiny byte-level bases written as `jaxlm train`
leaves them; `jaxlm eval --json` of the run then reports the figures the loop's final
evaluation logged (exact match, F1 / exact match, loss)."""

import json

import pytest
import run_fixture
from encoder_runs import base_config, write_base

from jaxlm.data.tokenizers import ByteTokenizer

pytestmark = pytest.mark.slow

CASES = {"qa_tiny": ("bert", ("loss", "exact_match", "f1", "examples")),
         "translate_tiny": ("t5", ("loss", "perplexity", "exact_match", "generated"))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_shipped_config_fine_tunes_and_evaluates_from_the_command_line(name, tmp_path):
    family, keys = CASES[name]
    tok = ByteTokenizer()
    cfg = base_config(family, tok, d_model=32, max_seq_len=256,
                      **({"head_dim": 8} if family == "t5" else {}))
    write_base(tmp_path / "base", cfg, tok, seed=2)
    run = tmp_path / "run"
    done = run_fixture.jaxlm_cli(
        "finetune", "--config", run_fixture.CONFIG_DIR / f"{name}.py",
        f"--config.finetune.base={tmp_path / 'base'}", "--workdir", run,
        "--config.train.steps=2", "--config.train.eval_every=2",
        "--config.data.global_batch_size=8", "--config.metrics.tensorboard=false")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "eval at step 2: eval_loss" in done.stdout and "eval_exact_match" in done.stdout
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in logged if "eval_loss" in m][-1]
    assert final["step"] == 2

    shown = run_fixture.jaxlm_cli("eval", "--workdir", run, "--json")
    assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
    result = json.loads(shown.stdout.strip().splitlines()[-1])
    assert {k: result[k] for k in keys} == {k: final[f"eval_{k}"] for k in keys}
    assert result["checkpoint"].endswith("checkpoints/2") and result["split"] == "validation"
