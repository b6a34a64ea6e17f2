"""Configuration: the schema of every section with its defaults, validation, config files
and the one override parser.

Owns:
    schema      every key a config may set and its default; the vocabularies of name values
    validate    each section's checks, the mesh shape for a device count, the data mixture,
                the embedding size
    finetune    the `finetune` section's keys and checks
    model       the `model` section's checks (sizes, backends, rope, weights, experts)
    overrides   config files (`--config FILE`) and `--config.section.key=value` overrides

May import: jaxlm.errors (and ml_collections). Nothing here imports JAX, touches the file
system (other than reading a config file asked for) or reads the environment, so loading
and checking a config is cheap and has no side effects.

The names below are the package's API: `from jaxlm import config; config.validate(...)`.
"""

from jaxlm.config.model import grouped_dims
from jaxlm.config.overrides import (
    apply_override,
    apply_overrides,
    load,
    load_config_file,
    merge_overrides,
    move_keys,
    split_overrides,
)
from jaxlm.config.schema import (
    BATCH_AXES,
    BUILTIN_DATASETS,
    DCN_KEYS,
    MESH_AXES,
    SOURCE_KINDS,
    defaults,
    require,
    source_defaults,
)
from jaxlm.config.validate import (
    ici_mesh_shape,
    lm_eval_tasks,
    mesh_shape,
    num_slices,
    parse_mixture,
    profile_window,
    resolve_vocab,
    resolved,
    validate,
)
from jaxlm.errors import ConfigError

__all__ = [
    "BATCH_AXES", "BUILTIN_DATASETS", "DCN_KEYS", "MESH_AXES", "SOURCE_KINDS", "ConfigError",
    "apply_override", "apply_overrides", "defaults", "grouped_dims", "ici_mesh_shape", "load",
    "lm_eval_tasks", "load_config_file", "merge_overrides", "mesh_shape", "move_keys", "num_slices", "parse_mixture",
    "profile_window", "require", "resolve_vocab", "resolved", "source_defaults", "split_overrides", "validate",
]
