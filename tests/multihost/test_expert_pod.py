"""Expert parallelism across processes: a local pod of 2 processes x 4 simulated CPU devices
with mesh expert 8 (each device holds one of moe_tiny's 8 experts; tokens reach experts on
the other process through the all-to-all) trains to the losses of the same mesh in one
process, and those of fsdp 8 with every expert on every device, within 1e-5 relative."""

import subprocess
import sys

import numpy as np
import pytest
from test_rehearsal import REPO, losses, overrides

from jaxlm import config as config_lib
from jaxlm.train import loop
from jaxlm.train.lm import CausalLM

STEPS = 3
CONFIG = REPO / "configs" / "moe_tiny.py"
EXPERT = ["--config.model.d_expert=48", "--config.mesh.data=1", "--config.mesh.fsdp=1",
          "--config.mesh.tensor=1", "--config.mesh.expert=8"]


@pytest.mark.slow
def test_experts_across_processes_equal_one_process(stdlib_data_dir, tmp_path):
    args = overrides(stdlib_data_dir, STEPS, every=1000) + EXPERT
    cfg = config_lib.load(CONFIG, args)
    assert (cfg.model.family, cfg.model.n_experts, cfg.mesh.expert) == ("moe", 8, 8)
    reference = {m["step"]: m["loss"] for m in loop.train(CausalLM(cfg), tmp_path / "one")}
    # ... which is the run without expert parallelism (fsdp over the 8 devices).
    plain = config_lib.load(CONFIG, args)
    plain.mesh.update(fsdp=8, expert=1)
    without = {m["step"]: m["loss"] for m in loop.train(CausalLM(plain), tmp_path / "plain")}
    steps = range(1, STEPS + 1)
    np.testing.assert_allclose([reference[s] for s in steps], [without[s] for s in steps],
                               rtol=1e-5)
    pod = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "launch", "local", "--processes", "2",
         "--devices-per-process", "4", "--", "train", "--config", str(CONFIG),
         "--workdir", str(tmp_path / "pod"), *args],
        capture_output=True, text=True, timeout=400)
    assert pod.returncode == 0, pod.stdout[-3000:] + pod.stderr[-3000:]
    got = losses(tmp_path / "pod")
    assert sorted(got) == sorted(reference) == list(steps)
    np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)
