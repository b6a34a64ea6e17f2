"""A command shows jaxlm's own lines only: no TFDS build announcements or progress bars
(a local source is built, nothing downloaded), no libtpu start-up warnings on a machine
without a TPU, no absl notices; `--verbose` lets them through."""

import importlib.util
import os
import re
import subprocess
import sys

# Every line `jaxlm train` prints on a fresh data directory, first step to last.
OWN_LINES = re.compile("|".join((
    r"source stdlib: \d+ train / \d+ validation documents; .*",
    r"model: llama, [\d,]+ parameters; mesh .*; compiled in [\d.]+s; peak .*",
    r"step \d+/\d+  loss \d+\.\d+  tok/s [\d,]+  MFU [\d.]+%  lr \S+  ETA \S+",
    r"checkpoint \d+ saved in [\d.]+ s \(training paused [\d.]+ s\)",
    r"",
    r"done: \d+ steps; checkpoints in .*",
    r"goodput [\d.]+% of [\d.]+s wall: step [\d.]+s, .*",
)))


def train(tmp_path, name, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAXLM_VERBOSE")}
    # JAX tries every backend it has: with libtpu installed, the TPU's (and warns) first.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "train", *extra, "--workdir", str(tmp_path / name),
         f"--config.data.data_dir={tmp_path / name}-data", "--config.train.steps=2",
         "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.d_ff=64",
         "--config.data.seq_len=64", "--config.data.global_batch_size=4"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def test_a_run_prints_only_its_own_lines_unless_verbose(tmp_path):
    quiet = train(tmp_path, "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stderr == ""
    strangers = [line for line in quiet.stdout.splitlines() if not OWN_LINES.fullmatch(line)]
    assert strangers == [], quiet.stdout

    verbose = train(tmp_path, "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Downloading and preparing dataset" in verbose.stdout  # TFDS's own words
    assert "Generating splits" in verbose.stderr  # its progress bars
    if libtpu_installed():
        assert "TPU" in verbose.stderr  # libtpu's start-up warnings
