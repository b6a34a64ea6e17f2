"""Test setup, done before jax is imported anywhere: 8 simulated CPU devices, and one
persistent compilation cache shared by every test of this run (its xdist workers and the
`jaxlm` subprocesses the tests start), so that a step compiled by one test is read back by
the next that compiles the same program. The cache starts empty each run and is removed at
its end."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = None  # set in the process that made the cache (xdist's workers inherit it)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxlm-tests-compilation-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker a core, at most 4 (each holds 8
    simulated devices and the models of its module)."""
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:  # the controller, after every worker has finished
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
