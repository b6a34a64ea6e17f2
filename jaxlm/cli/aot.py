"""`jaxlm compile`: a config's train step compiled for a TPU topology on any host, with
per-chip memory, FLOPs and the step time at a given MFU (jaxlm.train.aot). `jaxlm plan`:
the mesh, remat, gradient accumulation and attention (and, when --search names quant,
quantized training) that fit that topology and run fastest by a roofline estimate, found by
such compiles (jaxlm.train.plan).

    jaxlm compile --config configs/llama3_8b.py [--topology v5p-128] [--mfu 0.5]
    jaxlm plan --config configs/llama3_8b.py [--topology v5p-128] [--budget 840]

Exit codes: 0 it fits (a plan fits); 1 it does not fit in HBM (no plan fits; the figures
are printed); 2 bad input.
"""

from __future__ import annotations

import argparse
import os

from jaxlm import config as config_lib
from jaxlm.cli import helptext
from jaxlm.cli.train import DEFAULT_CONFIG, add_config_argument

VERBS = ("compile", "plan")


def add_parsers(verbs) -> None:
    comp = verbs.add_parser("compile", help="compile the train step for a TPU topology (on any "
                            "host) and print per-chip memory, FLOPs and step time",
                            description=__doc__, epilog=helptext.overrides_epilog())
    plan = verbs.add_parser("plan", help="find the mesh, remat, gradient accumulation, "
                            "attention (and quantized training) that fit a TPU topology and "
                            "run fastest (compiles candidates on any host)", description=__doc__,
                            epilog=helptext.overrides_epilog())
    for parser in (comp, plan):
        add_config_argument(parser)
        parser.add_argument("--topology", default="",
                            help="TPU slice, e.g. v5p-128, v5e-16, v5p:4x4x8 "
                                 "(default: config.mesh.topology)")
    comp.add_argument("--mfu", type=float, default=0.5,
                      help="model FLOPs utilisation assumed for the step time (default 0.5)")
    plan.add_argument("--budget", type=float, default=840,
                      help="seconds the search may spend compiling (default 840)")
    plan.add_argument("--search", default="mesh,remat,accum,attention",
                      help="what to vary, comma-separated, of mesh, remat, accum, attention "
                           "and quant (quantized training: it changes the numerics, so only "
                           "when named); the rest keep the config's values (default: "
                           "mesh,remat,accum,attention)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    # This host's own computations run on its CPU: with libtpu installed but no TPU here,
    # JAX would otherwise try to start a TPU backend. (Before JAX is imported.)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxlm.cli import tasks
    from jaxlm.train import aot, plan

    cfg = config_lib.load(args.config or DEFAULT_CONFIG, overrides)
    if args.verb == "plan":
        verb = "finetune" if cfg.finetune.task else "train"
        return plan.run(lambda c, n: tasks.for_config(c, num_devices=n), cfg, args.topology,
                        args.budget, f"jaxlm {verb} --config {args.config or DEFAULT_CONFIG}",
                        args.search)
    return aot.run(lambda num_devices: tasks.for_config(cfg, num_devices=num_devices), cfg,
                   args.topology, args.mfu)
