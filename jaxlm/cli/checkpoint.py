"""`jaxlm checkpoint {ls,inspect,export-params}`, `jaxlm lora merge`, `jaxlm quantize` and
`jaxlm prune`: what a run's checkpoints hold, and new run directories made from them (no
config overrides).

    jaxlm checkpoint ls WORKDIR
    jaxlm checkpoint inspect WORKDIR [--step N] [--json]
    jaxlm checkpoint export-params WORKDIR --out DIR [--dtype bfloat16] [--step N]
    jaxlm lora merge WORKDIR --out OUT [--step N]
    jaxlm quantize --workdir RUN --out OUT --weights int8|int4|nf4 [--group-size N]
    jaxlm prune --workdir RUN --out OUT --method depth (--layers N | --ratio R) [--batches 8]
    jaxlm prune --workdir RUN --out OUT --method width [--d-ff F] [--kv-heads G] [--ratio R]

WORKDIR may also be `WORKDIR/checkpoints` or one step, `WORKDIR/checkpoints/STEP`.
"""

from __future__ import annotations

import argparse
import pathlib

from jaxlm import errors

VERBS = ("checkpoint", "lora", "quantize", "prune")
# jaxlm.compress.prune.METHODS (a test checks they agree).
PRUNE_METHODS = ("depth", "width")
# jaxlm.config.schema.WEIGHT_FORMATS less "float" (a test checks they agree).
WEIGHT_FORMATS = ("int8", "int4", "nf4")
# jaxlm.checkpoint.export.EXPORT_DTYPES (a test checks they agree), named here so that
# `--help` does not import JAX.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def add_parsers(verbs) -> None:
    parser = verbs.add_parser("checkpoint", help="list, inspect or export a run's checkpoints "
                              "(reads no config)")
    actions = parser.add_subparsers(dest="action", required=True)
    where = "WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/STEP (default: latest step)"
    ls = actions.add_parser("ls", help="list finalized checkpoints: step, size, age, latest")
    ls.add_argument("path", metavar="WORKDIR", help="run directory (or its checkpoints/)")
    ins = actions.add_parser("inspect", help="config, layout and every parameter's shape/dtype/"
                             "axes, from metadata (no arrays read)")
    ins.add_argument("path", metavar="PATH", help=where)
    ins.add_argument("--step", type=int, default=None, help="step (default: the latest)")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead")
    exp = actions.add_parser("export-params", help="write the parameters alone (no optimizer "
                             "state) as an Orbax checkpoint in a chosen dtype")
    exp.add_argument("path", metavar="PATH", help=where)
    exp.add_argument("--out", required=True,
                     help="directory to create (must not exist, or be empty)")
    exp.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES,
                     help="dtype of the exported parameters")
    exp.add_argument("--step", type=int, default=None, help="step (default: the latest)")

    lora = verbs.add_parser("lora", help="LoRA tools: merge a run's adapters into its base")
    lora_actions = lora.add_subparsers(dest="action", required=True)
    merge = lora_actions.add_parser("merge", help="write base + adapters as a run directory that "
                                    "generate, eval and init_from read")
    merge.add_argument("workdir", metavar="WORKDIR", help="the LoRA run (or a step of it)")
    merge.add_argument("--out", required=True, help="directory to create (new or empty)")
    merge.add_argument("--step", type=int, default=None, help="default: the latest")

    quant = verbs.add_parser(
        "quantize", help="write a run's weights quantized (int8, int4, nf4) as a new run for "
        "generate, eval and scoring",
        description="Post-training weight-only quantization of a decoder run's newest "
        "checkpoint (jaxlm/infer/quantize.py): projections, embedding and LM head stored as "
        "integer codes with float scales; norms and biases float.")
    quant.add_argument("--workdir", required=True, help="the float run (read only)")
    quant.add_argument("--out", required=True, help="directory to create (new or empty)")
    quant.add_argument("--weights", required=True, choices=WEIGHT_FORMATS,
                       help="int8 (absmax, symmetric), int4, or nf4 (NormalFloat4 levels)")
    quant.add_argument("--group-size", type=int, default=None,
                       help="inputs per scale; 0: one scale per output channel (default: 0 "
                            "for int8, 32 for int4 and nf4); must divide d_model, d_ff and "
                            "head_dim")


    prune = verbs.add_parser(
        "prune", help="write a run with its least important blocks (depth) or MLP units and "
        "attention heads (width) removed, as a new run",
        description="Structured pruning of a decoder run's newest checkpoint "
        "(jaxlm/compress/prune.py), by importance measured on training batches: depth "
        "removes whole blocks (1 - mean cosine of a block's input and output); width removes "
        "MLP units and kv-head groups in every block (mean activation x outgoing weight norm).")
    prune.add_argument("--workdir", required=True, help="the float run (read only)")
    prune.add_argument("--out", required=True, help="directory to create (new or empty)")
    prune.add_argument("--method", default="depth", choices=PRUNE_METHODS,
                       help="depth: remove whole blocks; width: MLP units and kv heads")
    prune.add_argument("--layers", type=int, default=None, help="depth: blocks to keep")
    prune.add_argument("--d-ff", type=int, default=None, help="width: MLP units to keep")
    prune.add_argument("--kv-heads", type=int, default=None,
                       help="width: kv heads to keep (with the query heads that share them)")
    prune.add_argument("--ratio", type=float, default=None,
                       help="share of the parameters to keep, in (0, 1]: depth keeps the most "
                            "blocks, width the largest d_ff, whose model fits in it")
    prune.add_argument("--batches", type=int, default=8,
                       help="training batches the importance is measured on (default 8)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxlm.checkpoint.rundir import RunDirError
    if overrides:
        verb = " ".join([args.verb] + ([args.action] if "action" in args else []))
        raise RunDirError(f"`jaxlm {verb}` takes no config overrides: {' '.join(overrides)}")
    if args.verb == "quantize":
        from jaxlm.infer import quantize
        quantize.quantize_run(args.workdir, args.out, args.weights, args.group_size)
        return errors.DONE
    if args.verb == "prune":
        from jaxlm.compress import prune
        prune.prune_run(args.workdir, args.out, args.method, layers=args.layers,
                        d_ff=args.d_ff, kv_heads=args.kv_heads, ratio=args.ratio,
                        batches=args.batches)
        return errors.DONE
    if args.verb == "lora":
        from jaxlm.finetune import merge
        merge.merge_run(args.workdir, args.out, args.step)
        return errors.DONE
    from jaxlm.checkpoint import inspect
    if args.action == "ls":
        print(inspect.format_listing(inspect.list_checkpoints(args.path)))
    elif args.action == "inspect":
        info = inspect.inspect_checkpoint(args.path, args.step)
        print(inspect.inspection_json(info) if args.json else inspect.format_inspection(info))
    else:
        from jaxlm.checkpoint.export import export_params
        info = export_params(args.path, args.out, args.dtype, args.step)
        print(f"wrote {info['param_count']:,} parameters ({info['dtype']}, "
              f"{inspect.format_bytes(info['param_bytes'])}) of step {info['source']['step']} "
              f"to {pathlib.Path(args.out).expanduser().absolute()}")
    return errors.DONE
