"""Test setup, done before jax is imported anywhere: 8 simulated CPU devices; a watchdog
that ends a test stuck for TEST_LIMIT_S.

No persistent compilation cache: with one shared by the run, a step read back from it (a t5
LoRA step on fsdp 8, in tests/finetune/test_encoder_resume.py) now and then deadlocked in
XLA:CPU's collectives (one simulated device in an all-gather, the other seven in an
all-reduce of the same execution) until XLA aborted the process after 40 s: in 2 of 10
runs of that file with the cache, in none of 18 without, and in both full runs of the suite
with it on 2026-12-02 (xdist then waited forever for the lost worker).

A stuck test prints every thread's stack and ends its worker (faulthandler), and a worker
that ends ends the session (`--max-worker-restart=0` in pyproject's addopts): a hang or a
crash costs minutes and names where it happened, instead of holding CI until its limit.
"""

import faulthandler
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

TEST_LIMIT_S = 900  # 12x the slowest test (72 s on 2 cores, 2026-12-03)
_stderr_fd: int | None = None


def pytest_configure(config):
    global _stderr_fd
    _stderr_fd = os.dup(2)  # the terminal's stderr (capturing replaces fd 2 during a test)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=_stderr_fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker a core, at most 4 (each holds 8
    simulated devices and the models of its module)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory):
    """The default corpus, built once per test session into a temporary TFDS data_dir."""
    from jaxlm.data import sources

    data_dir = tmp_path_factory.mktemp("tfds")
    from jaxlm import config
    data_cfg = config.defaults().data
    data_cfg.data_dir = str(data_dir)
    sources.prepare(data_cfg, "stdlib")
    return str(data_dir)
