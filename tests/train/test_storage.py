"""Storage a run cannot trust: a disk that fills mid-run, every checkpoint damaged (real
`jaxlm train` processes; what they print is jaxlm's own lines, no library noise)."""

import pathlib
import shutil
import subprocess
import sys

import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)

from jaxlm import errors

REPO = pathlib.Path(__file__).parents[2]


def train_args(data_dir, workdir, steps, *extra):
    return ["train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.train.steps={steps}",
            "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.d_ff=192",
            "--config.data.seq_len=64", "--config.data.global_batch_size=16",
            "--config.train.log_every=1", "--config.metrics.peak_flops=1e11",
            "--config.metrics.tensorboard=false", *extra]


def jaxlm(*args):
    return run_fixture.jaxlm_cli(*args)


def small_filesystem_works(tmp_path) -> bool:
    """Whether this machine lets the test mount a private tmpfs (user namespaces, or root)."""
    if shutil.which("unshare") is None:
        return False
    mountpoint = tmp_path / "probe"
    mountpoint.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {mountpoint}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_disk_that_fills_mid_run_ends_it_with_one_line_keeping_every_checkpoint(
        stdlib_data_dir, tmp_path):
    if not small_filesystem_works(tmp_path):
        pytest.skip("cannot mount a small private tmpfs here (no user namespaces)")
    disk = tmp_path / "disk"
    disk.mkdir()
    workdir = disk / "run"
    # A state of ~1.6 MB: keep=1 passes the start-up check (2 checkpoints), but keeping every
    # step (keep_period=1) fills 8 MB within a few saves.
    train = [sys.executable, "-m", "jaxlm.cli", *train_args(
        stdlib_data_dir, workdir, 50, "--config.checkpoint.every=1", "--config.checkpoint.keep=1",
        "--config.checkpoint.keep_period=1")]
    listing = [sys.executable, "-m", "jaxlm.cli", "checkpoint", "ls", str(workdir)]
    script = (f"mount -t tmpfs -o size=8m tmpfs {disk} && {{ {subprocess.list2cmdline(train)}; "
              f"echo \"exit=$?\" >&2; {subprocess.list2cmdline(listing)}; }}")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600)
    err = done.stderr.splitlines()
    assert err[-1] == f"exit={errors.STORAGE}", done.stderr[-3000:]
    assert len(err) == 2, done.stderr[-3000:]  # jaxlm's line, nothing around it
    kept = sorted(int(line.split()[0]) for line in done.stdout.splitlines()
                  if line.split() and line.split()[0].isdigit())
    assert len(kept) >= 2 and kept == list(range(1, len(kept) + 1)), done.stdout
    assert err[0].startswith(f"jaxlm: no space left in {workdir / 'checkpoints'} while saving")
    assert err[0].endswith(f"; the complete checkpoints are kept (steps: "
                           f"{', '.join(map(str, kept))}); free space and run the same command "
                           f"again")


def test_every_checkpoint_damaged_stops_with_exit_2_and_renames_nothing(stdlib_data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = train_args(stdlib_data_dir, workdir, 4, "--config.checkpoint.every=2")
    assert jaxlm(*args).returncode == 0
    (workdir / "checkpoints" / "4" / "metadata" / "metadata").write_text('{"run": ')
    (workdir / "checkpoints" / "2" / "state" / "_METADATA").write_text("\x00garbage")
    refused = jaxlm(*args)
    assert refused.returncode == errors.BAD_INPUT, refused.stderr[-3000:]
    d = workdir / "checkpoints"
    assert refused.stderr.splitlines() == [
        f"warning: checkpoint {d / '4'} is damaged (JSONDecodeError: Expecting value: line 1 "
        f"column 9 (char 8)); trying the one before",
        f"warning: checkpoint {d / '2'} is damaged (JSONDecodeError: Expecting value: line 1 "
        f"column 1 (char 0)); trying the one before",
        f"jaxlm: every checkpoint in {d} is damaged; nothing was changed:",
        "  step 4: JSONDecodeError: Expecting value: line 1 column 9 (char 8)",
        "  step 2: JSONDecodeError: Expecting value: line 1 column 1 (char 0)",
        "to start again from step 0, setting them aside as <step>.corrupt, add "
        "--config.checkpoint.on_all_corrupt=restart"]
    assert sorted(p.name for p in d.iterdir()) == ["2", "4"]

    again = jaxlm(*args, "--config.checkpoint.on_all_corrupt=restart")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in d.iterdir()) == ["2", "2.corrupt", "4", "4.corrupt"]
