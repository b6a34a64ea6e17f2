"""`jaxlm convert {from-hf,to-hf,bench}` (wired into jaxlm.cli; reads no config).

    jaxlm convert from-hf HF_DIR --out WORKDIR
    jaxlm convert to-hf WORKDIR --out HF_DIR [--dtype bfloat16] [--max-shard-size 5GB] [--step N]
    jaxlm convert bench [--size-mb 300] [--dir DIR]
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxlm.convert.hf_export import DEFAULT_MAX_SHARD, EXPORT_DTYPES

    actions = parser.add_subparsers(dest="action", required=True)
    imp = actions.add_parser("from-hf", help="a local Hugging Face checkpoint (safetensors) -> "
                             "a jaxlm run directory (Orbax checkpoint, tokenizer, config.py)")
    imp.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json, "
                     "model.safetensors (or shards and their index) and tokenizer.json")
    imp.add_argument("--out", required=True, metavar="WORKDIR", help="run directory to create")
    exp = actions.add_parser("to-hf", help="a jaxlm checkpoint -> a directory transformers' "
                             "from_pretrained loads")
    exp.add_argument("workdir", metavar="WORKDIR",
                     help="run directory, its checkpoints/ or one step (default: latest)")
    exp.add_argument("--out", required=True, metavar="HF_DIR",
                     help="directory to create (must not exist, or be empty)")
    exp.add_argument("--dtype", default="float32", choices=list(EXPORT_DTYPES))
    exp.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                     help="larger models are split into shards of at most this size (5GB, 500MiB)")
    exp.add_argument("--step", type=int, default=None)
    bench = actions.add_parser("bench", help="peak resident memory of converting a random "
                               "LLaMA-style model, against its size")
    bench.add_argument("--size-mb", type=float, default=300.0,
                       help="approximate float32 size of the model (MB, 10^6 bytes)")
    bench.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")


def main(args: argparse.Namespace, overrides: list[str] = ()) -> int:
    """Runs one `convert` subcommand; 2 on bad input (the message names the file or tensor)."""
    from jaxlm.convert.hf_import import ConversionError

    try:
        if overrides:
            raise ConversionError(f"convert commands take no config overrides: "
                                  f"{' '.join(overrides)}")
        if args.action == "from-hf":
            from jaxlm.convert.hf_import import import_hf
            import_hf(args.hf_dir, args.out)
        elif args.action == "to-hf":
            from jaxlm.convert.hf_export import export_hf
            export_hf(args.workdir, args.out, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, step=args.step)
        else:
            from jaxlm.convert.bench import bench_convert
            bench_convert(size_mb=args.size_mb, directory=args.dir)
    except ConversionError as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    return 0
