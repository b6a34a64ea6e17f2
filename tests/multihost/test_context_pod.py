"""Context parallelism across processes: a local pod of 2 processes x 4 simulated CPU
devices with mesh context 8 (each row's positions spread over both processes) trains to the
losses of the same mesh in one process, and those of fsdp 8 without context parallelism,
within 1e-5 relative (gloo adds cross-process sums
in another order; see test_rehearsal.py)."""

import subprocess
import sys

import numpy as np
import pytest
from test_rehearsal import REPO, losses, overrides

from jaxlm import config as config_lib
from jaxlm.train import loop
from jaxlm.train.lm import CausalLM

STEPS = 3
CONTEXT = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
           "--config.mesh.context=8"]


@pytest.mark.slow
def test_context_across_processes_equals_one_process(stdlib_data_dir, tmp_path):

    args = overrides(stdlib_data_dir, STEPS, every=1000) + CONTEXT
    cfg = config_lib.load(REPO / "configs" / "tiny.py", args)
    assert cfg.mesh.context == 8
    reference = {m["step"]: m["loss"] for m in loop.train(CausalLM(cfg), tmp_path / "one")}
    # ... which is the run without context parallelism (fsdp over the 8 devices).
    plain = config_lib.load(REPO / "configs" / "tiny.py",
                            overrides(stdlib_data_dir, STEPS, every=1000))
    plain.mesh.update(data=1, fsdp=8, tensor=1, context=1)
    without = {m["step"]: m["loss"] for m in loop.train(CausalLM(plain), tmp_path / "plain")}
    np.testing.assert_allclose([reference[s] for s in range(1, STEPS + 1)],
                               [without[s] for s in range(1, STEPS + 1)], rtol=1e-5)
    pod = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "launch", "local", "--processes", "2",
         "--devices-per-process", "4", "--", "train", "--config",
         str(REPO / "configs" / "tiny.py"), "--workdir", str(tmp_path / "pod"), *args],
        capture_output=True, text=True, timeout=400)
    assert pod.returncode == 0, pod.stdout[-3000:] + pod.stderr[-3000:]
    got = losses(tmp_path / "pod")
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [reference[s] for s in sorted(got)], rtol=1e-5)
