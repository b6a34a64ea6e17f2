"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


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
