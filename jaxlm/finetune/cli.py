"""`jaxlm finetune` and `jaxlm lora merge` (wired into jaxlm.cli).

    jaxlm finetune --config configs/sft_tiny.py [--workdir runs/sft_tiny] [--config.k=v ...]
    jaxlm lora merge WORKDIR --out OUT [--step N]

Exit codes (as `jaxlm train`): 0 done; 2 bad input (the message names the key, file:line
or checkpoint); 3 non-finite loss; 75 preempted after saving (run again to resume).
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def add_arguments(verbs) -> None:
    ft = verbs.add_parser("finetune", help="fine-tune a checkpoint: SFT, LoRA, classification "
                          "(resumes from the workdir's latest checkpoint)")
    ft.add_argument("--config", required=True, help="config file (configs/sft_tiny.py, ...)")
    ft.add_argument("--workdir", default=None, help="run directory (default runs/<config name>)")
    # Multi-host start-up, as `jaxlm train` (jaxlm/distributed.py; SLURM and TPU VMs detected).
    ft.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
    ft.add_argument("--num-processes", type=int, default=None, help="processes of the run")
    ft.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1")
    lora = verbs.add_parser("lora", help="LoRA tools: merge a run's adapters into its base")
    actions = lora.add_subparsers(dest="action", required=True)
    merge = actions.add_parser("merge", help="write base + adapters as a run directory that "
                               "generate, eval and init_from read")
    merge.add_argument("workdir", metavar="WORKDIR", help="the LoRA run (or a step of it)")
    merge.add_argument("--out", required=True, help="directory to create (new or empty)")
    merge.add_argument("--step", type=int, default=None, help="default: the latest")


def _bad_input() -> tuple[type, ...]:
    from jaxlm import checkpoint as checkpoint_lib
    from jaxlm import config as config_lib
    from jaxlm.checkpoint_tools import CheckpointToolError
    from jaxlm.finetune.records import DataError
    from jaxlm.finetune.templates import TemplateError
    from jaxlm.finetune.trainer import BaseMismatchError
    return (config_lib.ConfigError, DataError, TemplateError, CheckpointToolError,
            BaseMismatchError, FileNotFoundError, checkpoint_lib.CheckpointMismatchError,
            checkpoint_lib.CorruptCheckpointError, checkpoint_lib.CheckpointStorageError)


def run_finetune(cfg, args: argparse.Namespace) -> int:
    from jaxlm import distributed
    try:  # before anything touches a device
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedConfigError as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    from jaxlm.finetune import trainer
    from jaxlm.train import preemption
    workdir = args.workdir or f"runs/{pathlib.Path(args.config).stem}"
    try:
        trainer.finetune(cfg, workdir)
    except trainer.Preempted as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return preemption.PREEMPTED_EXIT_CODE
    except trainer.NonFiniteLoss as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 3
    except _bad_input() as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    return 0


def run_lora(args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        if overrides:
            from jaxlm import config as config_lib
            raise config_lib.ConfigError(f"`jaxlm lora merge` takes no config overrides: "
                                         f"{' '.join(overrides)}")
        from jaxlm.finetune import merge
        merge.merge_run(args.workdir, args.out, args.step)
    except _bad_input() as e:
        print(f"jaxlm: {e}", file=sys.stderr)
        return 2
    return 0
