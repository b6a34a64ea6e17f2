"""`jaxlm convert {from-hf,to-hf}`: Hugging Face interop (jaxlm.convert; reads no config).

    jaxlm convert from-hf HF_DIR --out WORKDIR
    jaxlm convert to-hf WORKDIR --out HF_DIR [--dtype bfloat16] [--max-shard-size 5GB] [--step N]
        [--dequantize]
"""

from __future__ import annotations

import argparse

from jaxlm import errors

VERBS = ("convert",)
# jaxlm.convert.hf_export's EXPORT_DTYPES and DEFAULT_MAX_SHARD (a test checks they agree),
# named here so that `--help` does not import JAX.
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD = "5GB"


def add_parsers(verbs) -> None:
    parser = verbs.add_parser("convert", help="Hugging Face interop: from-hf, to-hf (reads no "
                              "config)")
    actions = parser.add_subparsers(dest="action", required=True)
    imp = actions.add_parser("from-hf", help="a local Hugging Face checkpoint (safetensors) -> "
                             "a jaxlm run directory (Orbax checkpoint, tokenizer, config.py "
                             "reading config_values.json)")
    imp.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json, "
                     "model.safetensors (or shards and their index) and tokenizer.json")
    imp.add_argument("--out", required=True, metavar="WORKDIR", help="run directory to create")
    exp = actions.add_parser("to-hf", help="a jaxlm checkpoint -> a directory transformers' "
                             "from_pretrained loads")
    exp.add_argument("workdir", metavar="WORKDIR",
                     help="run directory, its checkpoints/ or one step (default: latest)")
    exp.add_argument("--out", required=True, metavar="HF_DIR",
                     help="directory to create (must not exist, or be empty)")
    exp.add_argument("--dtype", default="float32", choices=list(EXPORT_DTYPES),
                     help="dtype of the written weights")
    exp.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                     help="larger models are split into shards of at most this size (5GB, 500MiB)")
    exp.add_argument("--step", type=int, default=None,
                     help="checkpoint step to convert (default: the latest)")
    exp.add_argument("--dequantize", action="store_true",
                     help="a quantized run (`jaxlm quantize`): write the float values its "
                          "codes and scales stand for (default: refused)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Runs one `convert` subcommand; 2 on bad input (the message names the file or tensor)."""
    from jaxlm.convert.hf_import import ConversionError
    if overrides:
        raise ConversionError(f"convert commands take no config overrides: {' '.join(overrides)}")
    if args.action == "from-hf":
        from jaxlm.convert.hf_import import import_hf
        import_hf(args.hf_dir, args.out)
    else:
        from jaxlm.convert.hf_export import export_hf
        export_hf(args.workdir, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  step=args.step, dequantize=args.dequantize)
    return errors.DONE
