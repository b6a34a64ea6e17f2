"""Offline distillation on a 2-process local pod (2 x 4 simulated CPU devices, gloo):
`jaxlm distill cache` written by two processes (a file each, meta.json from process 0)
holds what one process with 8 devices writes, and a run taught from a cache trains on two
processes as on one (losses within 1e-5 relative: sums that cross the process boundary run
over gloo, in another order than XLA's in-process reductions)."""

import json

import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from test_finetune_pod import on_two_processes, train_records

from jaxlm import cli
from jaxlm.data import teacher_cache

STEPS = 3


def overrides(data_dir, teacher):
    """configs/tiny.py cut to test size: a 1-block student of the 2-block teacher."""
    return ["--config", run_fixture.CONFIG_DIR / "tiny.py", f"--config.data.data_dir={data_dir}",
            f"--config.distill.teacher={teacher}", "--config.model.n_layers=1",
            "--config.model.d_model=32", "--config.model.n_heads=4",
            "--config.model.n_kv_heads=2", "--config.model.d_ff=48", "--config.data.seq_len=32",
            "--config.data.global_batch_size=8", f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", "--config.checkpoint.every=2",
            "--config.metrics.peak_flops=1e11", "--config.metrics.tensorboard=false"]


@pytest.mark.slow
def test_a_cache_written_and_read_by_two_processes_equals_one_process(stdlib_data_dir,
                                                                       tmp_path):
    teacher = tmp_path / "teacher"
    run_fixture.write_run(teacher, run_fixture.tiny_run_config(stdlib_data_dir), seed=4)
    args = [str(a) for a in overrides(stdlib_data_dir, teacher)]
    one, two = tmp_path / "cache1", tmp_path / "cache2"
    assert cli.main(["distill", "cache", *args, "--out", str(one), "--top-k", "16"]) == 0
    on_two_processes("distill", "cache", *args, "--out", two, "--top-k", "16")

    meta1, meta2 = (json.loads((d / "meta.json").read_text()) for d in (one, two))
    assert [f["rows"] for f in meta2.pop("files")] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [f["rows"] for f in meta1.pop("files")] == [list(range(8))]
    assert meta1 == meta2
    caches = teacher_cache.TeacherCache(one), teacher_cache.TeacherCache(two)
    for step in range(STEPS):
        a, b = (c.read_step(step, range(8)) for c in caches)
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["teacher_ids"], b["teacher_ids"])
        np.testing.assert_allclose(a["teacher_logits"], b["teacher_logits"], rtol=1e-6)

    # Trained from the two-process cache: here (8 devices) and on two processes.
    here, pod = tmp_path / "here", tmp_path / "pod"
    assert cli.main(["train", *args, f"--config.distill.cache={two}", "--workdir",
                     str(here)]) == 0
    on_two_processes("train", *args, f"--config.distill.cache={two}", "--workdir", pod)
    assert [r["step"] for r in train_records(pod)] == list(range(1, STEPS + 1))
    for key in ("loss", "kd_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in train_records(pod)],
                                   [r[key] for r in train_records(here)], rtol=1e-5)
