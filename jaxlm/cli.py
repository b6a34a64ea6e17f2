"""`jaxlm <verb>`: the command line.

Configs follow the ml_collections convention: `--config FILE` names a config file and
`--config.section.key=value` overrides one value (parsed as the type of its default).

    jaxlm train [--config configs/tiny.py] [--config.train.steps=100] [--workdir runs/x]
    jaxlm launch local --processes 2 --devices-per-process 4 -- train --config configs/tiny.py
    jaxlm bench step --config configs/bench_cpu.py
    jaxlm bench data --config configs/bench_cpu.py
    jaxlm bench checkpoint --config configs/bench_cpu.py
    jaxlm tokenizer train --config configs/tiny.py --vocab-size 8000 --out tok.model
    jaxlm generate --workdir runs/tiny --prompt "import os"
    jaxlm eval --workdir runs/tiny [--split validation]
    jaxlm bench generate
    jaxlm compile --config configs/llama3_8b.py [--topology v5p-128] [--mfu 0.5]
    jaxlm finetune --config configs/sft_tiny.py [--workdir runs/sft_tiny]
    jaxlm lora merge runs/lora_tiny --out runs/lora_tiny-merged
    jaxlm bench lora --config configs/bench_cpu.py [--steps 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

import ml_collections

from jaxlm import config as config_lib

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def parse_value(key: str, text: str, current):
    """Parses `text` as the type of the key's current value."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise config_lib.ConfigError(f"config.{key}: expected true or false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise config_lib.ConfigError(f"config.{key}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise config_lib.ConfigError(f"config.{key}: expected a number, got {text!r}") from None
    if isinstance(current, str) or current is None:
        return text
    return ast.literal_eval(text)


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    *sections, leaf = dotted.split(".")
    node = cfg
    for i, name in enumerate(sections):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise config_lib.ConfigError(f"unknown config key: config.{'.'.join(sections[:i + 1])}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise config_lib.ConfigError(f"unknown config key: config.{dotted}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise config_lib.ConfigError(f"config.{dotted} is a section; set one of its keys")
    node[leaf] = parse_value(dotted, text, node[leaf])


def load_config(config_path: str | None, overrides: list[str]) -> ml_collections.ConfigDict:
    cfg = config_lib.load_config_file(config_path or DEFAULT_CONFIG)
    for item in overrides:
        if "=" not in item:
            raise config_lib.ConfigError(f"override {item!r} must look like --config.key=value")
        dotted, text = item.split("=", 1)
        apply_override(cfg, dotted[len("--config."):], text)
    return cfg


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="pretrain (resumes from the workdir's latest checkpoint)")
    train.add_argument("--config", default=None, help=f"config file (default {DEFAULT_CONFIG.name})")
    train.add_argument("--workdir", default=None, help="run directory (default runs/<config name>)")
    # Multi-host start-up (jaxlm/distributed.py); without them SLURM or a TPU VM is detected.
    train.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
    train.add_argument("--num-processes", type=int, default=None, help="processes of the run")
    train.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1")
    verbs.add_parser("launch", help="jaxlm launch local --processes N --devices-per-process M -- "
                     "train ...: rehearse a pod on this host (see jaxlm/launch_local.py)")
    bench = verbs.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("what", choices=["step", "data", "checkpoint", "generate", "lora"])
    bench.add_argument("--rounds", type=int, default=5,
                       help="lora: alternating rounds of full and LoRA steps (default 5)")
    bench.add_argument("--config", default=None)
    bench.add_argument("--steps", type=int, default=None,
                       help="step: timed steps after compilation (default 5); checkpoint: "
                            "steps per timed round (default 5)")
    bench.add_argument("--batches", type=int, default=2000, help="data: timed batches")
    tok = verbs.add_parser("tokenizer", help="train a SentencePiece tokenizer on the configured data")
    tok.add_argument("action", choices=["train"])
    tok.add_argument("--config", default=None)
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--out", required=True, help="path of the .model file to write")
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tok.add_argument("--max-documents", type=int, default=100_000,
                     help="documents of the train split read (in order)")
    comp = verbs.add_parser("compile", help="compile the train step for a TPU topology (on any "
                            "host) and print per-chip memory, FLOPs and step time")
    comp.add_argument("--config", default=None)
    comp.add_argument("--topology", default="",
                      help="TPU slice, e.g. v5p-128, v5e-16, v5p:4x4x8 (default: config.mesh.topology)")
    comp.add_argument("--mfu", type=float, default=0.5,
                      help="model FLOPs utilisation assumed for the step time (default 0.5)")
    from jaxlm import checkpoint_tools
    ckpt = verbs.add_parser("checkpoint", help="list, inspect or export a run's checkpoints "
                            "(reads no config)")
    checkpoint_tools.add_arguments(ckpt)
    from jaxlm.convert import cli as convert_cli
    convert_cli.add_arguments(verbs.add_parser(
        "convert", help="Hugging Face interop: from-hf, to-hf, bench (reads no config)"))
    from jaxlm import inference_cli
    inference_cli.add_arguments(verbs)  # generate, eval
    from jaxlm.finetune import cli as finetune_cli
    finetune_cli.add_arguments(verbs)  # finetune, lora
    return parser


def train_tokenizer(cfg: ml_collections.ConfigDict, args: argparse.Namespace) -> None:
    """Trains SentencePiece on the train split of every source in data.dataset."""
    from jaxlm.data import sources, tokenizers

    names = [name for name, _ in config_lib.parse_mixture(cfg.data.dataset)]
    for name in names:
        sources.prepare(cfg.data, name)

    def documents():
        count = 0
        for name in names:
            source = sources.load(cfg.data, name, "train")
            for i in range(len(source)):
                if count == args.max_documents:
                    return
                text = source[i]["text"]
                yield text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                count += 1

    path = tokenizers.train_sentencepiece(documents(), args.out, args.vocab_size,
                                          model_type=args.model_type)
    print(f"wrote {path}; use it with --config.data.tokenizer=sentencepiece "
          f"--config.data.tokenizer_path={path}")


NONFINITE_EXIT_CODE = 3


def run_train(cfg: ml_collections.ConfigDict, args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 2 bad input; 3 non-finite loss (train.nonfinite=stop);
    75 preempted by SIGTERM/SIGINT after saving a checkpoint (run again to resume);
    130 a second signal aborted without saving."""
    from jaxlm import distributed
    try:  # before anything touches a device
        plan = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedConfigError as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    if plan.kind != "single":
        print(f"jaxlm: multi-host start-up: {plan.describe()}", file=sys.stderr, flush=True)
    import jax
    from jaxlm.train import loop, preemption
    name = pathlib.Path(args.config or DEFAULT_CONFIG).stem
    try:
        loop.train(cfg, args.workdir or f"runs/{name}")
    except loop.Preempted as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return preemption.PREEMPTED_EXIT_CODE
    except loop.NonFiniteLoss as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except Exception as e:
        from jaxlm.checkpoint import CheckpointStorageError
        from jaxlm.data.sources import SourceError
        bad_input = (config_lib.ConfigError, FileNotFoundError, SourceError, CheckpointStorageError)
        # Bad input fails alike on every process (exit 2 in main). Anything else: leave at
        # once, so the other processes learn of it within one heartbeat timeout.
        if jax.process_count() > 1 and not isinstance(e, bad_input):
            distributed.exit_now(1)
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # its arguments after `--` are a whole jaxlm command line
        from jaxlm import launch_local
        return launch_local.main(argv[1:])
    plain, overrides = split_overrides(argv)
    args = build_parser().parse_args(plain)
    if args.verb == "checkpoint":  # what a checkpoint says about itself; no config is loaded
        from jaxlm import checkpoint_tools
        return checkpoint_tools.main(args, overrides)
    if args.verb == "convert":  # Hugging Face import/export; no config is loaded
        from jaxlm.convert import cli as convert_cli
        return convert_cli.main(args, overrides)
    if args.verb in ("generate", "eval"):  # the run's saved config; overrides apply on top
        from jaxlm import inference_cli
        return inference_cli.main(args, overrides)
    if args.verb == "lora":  # a LoRA run's saved config; no config is loaded
        from jaxlm.finetune import cli as finetune_cli
        return finetune_cli.run_lora(args, overrides)
    try:
        cfg = load_config(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    try:
        if args.verb == "train":
            if cfg.finetune.task:
                raise config_lib.ConfigError(f"config.finetune.task={cfg.finetune.task!r}: "
                                             f"this is a fine-tuning config; run `jaxlm finetune`")
            return run_train(cfg, args)
        elif args.verb == "finetune":
            from jaxlm.finetune import cli as finetune_cli
            return finetune_cli.run_finetune(cfg, args)
        elif args.verb == "bench":
            from jaxlm import bench
            if args.what == "step":
                bench.bench_step(cfg, steps=args.steps or 5)
            elif args.what == "generate":
                from jaxlm import bench_generate
                bench_generate.bench_generate()
            elif args.what == "checkpoint":
                bench.bench_checkpoint(cfg, steps=args.steps or 5)
            elif args.what == "lora":
                from jaxlm.finetune import bench as finetune_bench
                finetune_bench.bench_lora(cfg, steps=args.steps or 2, rounds=args.rounds)
            else:
                bench.bench_data(cfg, batches=args.batches)
        elif args.verb == "tokenizer":
            train_tokenizer(cfg, args)
        elif args.verb == "compile":  # exit 1: the step does not fit in HBM
            from jaxlm import aot
            return aot.run(cfg, args.topology, args.mfu)
    except (config_lib.ConfigError, FileNotFoundError) as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        from jaxlm.checkpoint import CheckpointStorageError
        from jaxlm.data.sources import SourceError
        if not isinstance(e, (SourceError, CheckpointStorageError)):
            raise
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
