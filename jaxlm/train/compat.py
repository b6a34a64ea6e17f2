"""What may change when a run resumes, checked before the resumed run writes anything.

A checkpoint records the whole config it was saved with. Resuming compares it with the
config now, key by key, in three classes:

- fixed (refused, exit 2, with a table of saved vs now): what the model is and which tokens
  each step reads: `model.*` (except how it is computed: `remat`, `attention`, `dtype`),
  `data.*` (except where the cache lives and how far ahead it reads: `data_dir`,
  `prefetch`), `objective.*`, `train.seed`, `finetune.*` (except `eval_file` and `base`,
  whose parameters are checked by their fingerprint instead), `distill.*` (except
  `teacher`, checked by its fingerprint too);
- guarded (accepted only with `--config.train.allow_config_change=true`, then printed as a
  table and recorded in the checkpoint metadata as `config_changes`): the optimizer and the
  schedule (`optim.*`, `train.steps`) and the compute dtype (`model.dtype`);
- free: everything else (mesh, checkpoint cadence and retention, metrics, log_every,
  nonfinite, evaluation and profiling, ...).

The tokenizer belongs to the run as well: the one saved in the workdir must be the
config's (same kind, model file and special ids), or the resume is refused.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from jaxlm.errors import UserError

FREE = ("mesh.", "checkpoint.", "metrics.", "train.log_every", "train.nonfinite",
        "train.allow_config_change", "train.eval_every", "train.eval_batches",
        "train.profile_steps", "train.profile_all_processes", "train.lm_eval_every",
        "train.lm_eval_tasks", "train.lm_eval_include_path", "train.lm_eval_limit",
        "model.remat", "model.attention", "data.data_dir", "data.prefetch", "finetune.eval_file",
        "finetune.base", "distill.teacher")
GUARDED = ("optim.", "train.steps", "model.dtype", "quant.")


class ResumeConfigError(UserError):
    """The config now differs from the run's where it may not (or without permission)."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, (dict, ml_collections.ConfigDict)):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def differences(saved: ml_collections.ConfigDict, now: ml_collections.ConfigDict
                ) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value now) of every key that differs and is not free."""
    saved_flat, now_flat = _flat(saved.to_dict()), _flat(now.to_dict())
    missing = object()
    out = []
    for key in sorted(set(saved_flat) | set(now_flat)):
        a, b = saved_flat.get(key, missing), now_flat.get(key, missing)
        if _matches(key, FREE) or _same(a, b):
            continue
        out.append((key, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
    return out


def table(rows: list[tuple[str, Any, Any]]) -> str:
    """Rows of (key, saved, now) as an aligned text table."""
    lines = [("key", "saved", "now")] + [(f"config.{k}", json.dumps(a, default=str),
                                          json.dumps(b, default=str)) for k, a, b in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(2)]
    return "\n".join(f"  {k:<{widths[0]}}  {a:<{widths[1]}}  {b}" for k, a, b in lines)


def check(saved: ml_collections.ConfigDict, now: ml_collections.ConfigDict, where: str,
          step: int) -> list[dict[str, Any]]:
    """The accepted changes (guarded keys, when now.train.allow_config_change) as records
    {"step", "key", "saved", "now"}; raises ResumeConfigError for any other difference."""
    rows = differences(saved, now)
    fixed = [r for r in rows if not _matches(r[0], GUARDED)]
    if fixed:
        raise ResumeConfigError(
            f"cannot resume {where}: the run was saved with other values of settings that "
            f"fix the model or the order of its data:\n{table(fixed)}\nrun with the saved "
            f"values, or start a new run in another --workdir")
    if rows and not now.train.allow_config_change:
        raise ResumeConfigError(
            f"cannot resume {where} with other optimizer or schedule settings than it was "
            f"saved with:\n{table(rows)}\nto resume with the new values, add "
            f"--config.train.allow_config_change=true (the change is recorded in the run)")
    return [{"step": step, "key": k, "saved": a, "now": b} for k, a, b in rows]


def tokenizer_identity(tok: Any) -> tuple:
    """What makes two tokenizers give the same ids: kind, model file, vocabulary, specials,
    and whether a document starts with BOS."""
    return (tok.name, tok.fingerprint, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id,
            tok.adds_bos)


def describe_tokenizer(tok: Any) -> str:
    return (f"{tok.name}, {tok.vocab_size:,} ids"
            + (f", model sha256 {tok.fingerprint[:12]}" if tok.fingerprint != tok.name else ""))
