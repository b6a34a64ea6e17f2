"""`jaxlm config show`: the config a command would run, printed before anything starts.

    jaxlm config show [--config configs/tiny.py] [--config.train.steps=100 ...] [--json]
    jaxlm config show --workdir runs/tiny [--step N] [--config.k=v ...] [--json]

--config: the file with the overrides applied, checked as `jaxlm train` checks it (a
fine-tuning config as `jaxlm finetune` does before it reads the base) for --num-devices
devices. --workdir: the config saved with the run's newest checkpoint (or --step's), the
overrides on top, as `jaxlm generate` and `jaxlm eval` read it; checked with the run's mesh
fitted to this host as they fit it. model.vocab_size 0 stays 0: the run takes it from the
tokenizer (rounded up to data.vocab_multiple).

Output: YAML, keys sorted (every key of every section, defaults included), or one JSON
object with --json. Exit 2 on a bad value or an unknown key, one line naming it.
"""

from __future__ import annotations

import argparse
import json

import ml_collections

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.cli import helptext
from jaxlm.cli.train import DEFAULT_CONFIG, add_config_argument
from jaxlm.parallel import topology
from jaxlm.train import validate as train_validate

VERBS = ("config",)


def add_parsers(verbs) -> None:
    parser = verbs.add_parser("config", help="show the resolved, validated config of a config "
                              "file or of a run")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the config a command would run (YAML, or "
                              "JSON with --json)", description=__doc__,
                              epilog=helptext.overrides_epilog(
                                  "the config file's values (or, with --workdir, the run's)"))
    source = show.add_mutually_exclusive_group()
    add_config_argument(source)
    source.add_argument("--workdir", default=None, metavar="RUN",
                        help="a run directory: show the config saved with its newest "
                             "checkpoint instead")
    show.add_argument("--step", type=int, default=None,
                      help="with --workdir: this checkpoint step's config (default: the newest)")
    show.add_argument("--num-devices", type=int, default=None,
                      help="devices the mesh is checked for (default: mesh.topology's chips "
                           "when set, else this host's JAX devices, as `jaxlm train` counts)")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of YAML")


def format_config(cfg: ml_collections.ConfigDict, as_json: bool) -> str:
    """The config as YAML (keys sorted) or as an indented JSON object."""
    plain = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists: plain YAML
    if as_json:
        return json.dumps(plain, indent=2, sort_keys=True)
    import yaml  # ml_collections' own dependency
    return yaml.safe_dump(plain, sort_keys=True, default_flow_style=False).rstrip("\n")


def devices_for(cfg: ml_collections.ConfigDict) -> int:
    """The devices a run of `cfg` sees: its TPU slices' chips, else this host's (JAX)."""
    if cfg.mesh.topology:
        try:
            chips = topology.parse(cfg.mesh.topology).chips
        except topology.TopologyError as e:
            raise config_lib.ConfigError(f"config.mesh.topology: {e}") from None
        return chips * config_lib.num_slices(cfg.mesh)
    import jax
    return jax.device_count()


def check(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """What `jaxlm train` checks (every section, the model family, the topology); for a
    fine-tuning config what `jaxlm finetune` checks before it reads the base (whose model
    replaces this config's)."""
    if cfg.finetune.task:
        config_lib.validate(cfg, num_devices)
        return
    train_validate.validate(cfg, num_devices)


def of_file(args: argparse.Namespace, overrides: list[str]) -> ml_collections.ConfigDict:
    if args.step is not None:
        raise config_lib.ConfigError("--step: only with --workdir")
    cfg = config_lib.load(args.config or DEFAULT_CONFIG, overrides)
    check(cfg, args.num_devices or devices_for(cfg))
    return cfg


def of_run(args: argparse.Namespace, overrides: list[str]) -> ml_collections.ConfigDict:
    from jaxlm.checkpoint import rundir
    cfg, _ = rundir.saved_config(args.workdir, args.step)
    config_lib.apply_overrides(cfg, overrides)
    if args.num_devices:
        check(cfg, args.num_devices)
    else:
        import jax

        from jaxlm.parallel import mesh as mesh_lib
        check(mesh_lib.fit_mesh(cfg), jax.device_count())
    return cfg


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.num_devices is not None and args.num_devices < 1:
        raise config_lib.ConfigError(f"--num-devices: must be positive, got {args.num_devices}")
    cfg = of_run(args, overrides) if args.workdir else of_file(args, overrides)
    print(format_config(cfg, args.json))
    return errors.DONE
