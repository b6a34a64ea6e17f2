"""The whole config of a run, checked before anything expensive starts: every section
(jaxlm.config), the model family and its own constraints (jaxlm.model) and the TPU slice
named by mesh.topology (jaxlm.parallel.topology). Every command that runs or compiles a
config calls `validate` first; a bad value is one ConfigError naming its key."""

from __future__ import annotations

import ml_collections

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.model import zoo
from jaxlm.parallel import topology


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    config_lib.validate(cfg, num_devices)
    zoo.validate(cfg.model)
    if cfg.mesh.topology:
        try:
            topology.parse(cfg.mesh.topology)
        except topology.TopologyError as e:
            raise ConfigError(f"config.mesh.topology: {e}") from None
