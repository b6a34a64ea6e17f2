"""`jaxlm bench <what>`: every benchmark (jaxlm.bench); each prints its figures.

    jaxlm bench step --config configs/bench_cpu.py [--steps 5]
    jaxlm bench step --config configs/bench_cpu_bert.py      (also configs/bench_cpu_t5.py)
    jaxlm bench data --config configs/bench_cpu.py [--batches 2000]
    jaxlm bench data --config configs/bench_cpu.py --huge-document-mb 1024 [--dir DIR]
    jaxlm bench checkpoint --config configs/bench_cpu.py [--steps 5]
    jaxlm bench lora --config configs/bench_cpu.py [--steps 2] [--rounds 5]
    jaxlm bench generate [--rounds 5] [--family t5]
    jaxlm bench convert [--size-mb 300] [--dir DIR]
    jaxlm bench quant --workdir runs/tiny [--rounds 5]
    jaxlm bench lm-eval --workdir runs/tiny [--rounds 3]
    jaxlm bench compress --workdir runs/tiny --runs pruned=runs/tiny-half,... [--rounds 3]
"""

from __future__ import annotations

import argparse

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.cli import helptext
from jaxlm.cli.train import DEFAULT_CONFIG, add_config_argument

VERBS = ("bench",)


def add_parsers(verbs) -> None:
    bench = verbs.add_parser("bench", help="benchmarks that print figures", description=__doc__,
                             epilog=helptext.overrides_epilog() + " (step, data, checkpoint, "
                             "lora; generate, convert, quant, compress and lm-eval take no config)")
    bench.add_argument("what", choices=["step", "data", "checkpoint", "generate", "lora",
                                        "convert", "quant", "compress", "lm-eval"],
                       help="the benchmark")
    bench.add_argument("--workdir", default=None,
                       help="quant: the trained decoder run to quantize; compress: the teacher "
                            "(read only); lm-eval: the decoder run scored")
    bench.add_argument("--runs", default=None,
                       help="compress: NAME=RUN,... the runs made from the teacher (pruned, "
                            "trained on, distilled) to compare with it")
    add_config_argument(bench)
    bench.add_argument("--steps", type=int, default=None,
                       help="step: timed steps after compilation (default 5); checkpoint: "
                            "steps per timed round (default 5); lora: steps per round "
                            "(default 2)")
    bench.add_argument("--rounds", type=int, default=5,
                       help="lora: alternating rounds of full and LoRA steps; generate: "
                            "rounds of jaxlm and transformers (and of cached and recomputing "
                            "decoding), interleaved (default 5)")
    bench.add_argument("--family", choices=["llama", "t5"], default=None,
                       help="generate: the model against transformers: llama (decoder-only, "
                            "LlamaForCausalLM; default) or t5 (encoder-decoder, "
                            "T5ForConditionalGeneration)")
    bench.add_argument("--batches", type=int, default=2000, help="data: timed batches")
    bench.add_argument("--huge-document-mb", type=float, default=None,
                       help="data: instead, the loader's peak memory on a source that is one "
                            "document of this many MB (10^6 bytes)")
    bench.add_argument("--huge-document-kind", choices=["text", "jsonl"], default="text",
                       help="data: the huge document as a text file or one JSONL line")
    bench.add_argument("--size-mb", type=float, default=300.0,
                       help="convert: approximate float32 size of the model (MB, 10^6 bytes)")
    bench.add_argument("--dir", default=None,
                       help="convert, data --huge-document-mb: scratch directory (default: a "
                            "temporary one)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.rounds < 1:
        raise config_lib.ConfigError(f"--rounds: must be at least 1, got {args.rounds}")
    if args.family is not None and args.what != "generate":
        raise config_lib.ConfigError(f"--family: only `jaxlm bench generate` takes it, not "
                                     f"`jaxlm bench {args.what}`")
    if (args.workdir is None) != (args.what not in ("quant", "compress", "lm-eval")):
        raise config_lib.ConfigError("--workdir: `jaxlm bench quant`, `compress` and `lm-eval` "
                                     "need it (the trained run); no other benchmark takes it")
    if (args.runs is None) != (args.what != "compress"):
        raise config_lib.ConfigError("--runs: `jaxlm bench compress` needs it (NAME=RUN,...); "
                                     "no other benchmark takes it")
    if args.what == "compress":
        if overrides or args.config:
            raise config_lib.ConfigError("`jaxlm bench compress` takes no config: the runs' own")
        from jaxlm.bench.compress import bench_compress, parse_runs
        from jaxlm.cli import tasks
        bench_compress(args.workdir, parse_runs(args.runs), tasks.for_run, rounds=args.rounds)
        return errors.DONE
    if args.what == "lm-eval":
        if overrides or args.config:
            raise config_lib.ConfigError("`jaxlm bench lm-eval` takes no config: the run's own")
        from jaxlm.bench.harness import bench_harness
        bench_harness(args.workdir, rounds=args.rounds)
        return errors.DONE
    if args.what == "quant":
        if overrides or args.config:
            raise config_lib.ConfigError("`jaxlm bench quant` takes no config: the run's own")
        from jaxlm.bench.quant import bench_quant
        from jaxlm.cli import tasks
        bench_quant(args.workdir, tasks.for_run, rounds=args.rounds)
        return errors.DONE
    if args.what in ("generate", "convert"):  # fixed models of their own
        if overrides or args.config:
            raise config_lib.ConfigError(f"`jaxlm bench {args.what}` takes no config")
        if args.what == "generate" and args.family == "t5":
            from jaxlm.bench.generate_seq2seq import bench_generate_seq2seq
            bench_generate_seq2seq(repeats=args.rounds)
        elif args.what == "generate":
            from jaxlm.bench.generate import bench_generate
            bench_generate(repeats=args.rounds)
        else:
            from jaxlm.bench.convert import bench_convert
            bench_convert(size_mb=args.size_mb, directory=args.dir)
        return errors.DONE
    cfg = config_lib.load(args.config or DEFAULT_CONFIG, overrides)
    if args.what == "step":
        from jaxlm.bench.step import bench_step
        bench_step(cfg, steps=args.steps or 5)
    elif args.what == "data":
        from jaxlm.bench.data import bench_data, bench_huge_document
        if args.huge_document_mb is None:
            bench_data(cfg, batches=args.batches)
        elif not args.huge_document_mb > 0:
            raise config_lib.ConfigError(f"--huge-document-mb: must be positive, got "
                                         f"{args.huge_document_mb}")
        else:
            bench_huge_document(cfg, args.huge_document_mb, kind=args.huge_document_kind,
                                batches=args.batches, directory=args.dir)
    elif args.what == "checkpoint":
        from jaxlm.bench.checkpoint import bench_checkpoint
        bench_checkpoint(cfg, steps=args.steps or 5)
    else:
        from jaxlm.bench.lora import bench_lora
        bench_lora(cfg, steps=args.steps or 2, rounds=args.rounds)
    return errors.DONE
