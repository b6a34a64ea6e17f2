"""Weights & Biases logging beside metrics.jsonl and TensorBoard (`metrics.wandb=true`).

One W&B run per jaxlm run: its id is kept in WORKDIR/wandb_run.json, so a resumed run
continues the same W&B run (`resume="allow"`). Logged: the same scalars as metrics.jsonl at
the same steps, and the full config. A resumed run does not log again the steps W&B already
has (the rows a resume supersedes in metrics.jsonl; a resume is bit-exact, so they are
the same values). Offline mode (`metrics.wandb_mode="offline"`) writes under
WORKDIR/wandb/ and needs no network; `wandb sync WORKDIR/wandb/offline-run-*` uploads it.
W&B's console capture is off (jaxlm prints its own progress); its notices show with
--verbose only.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
from typing import Any, Mapping

import ml_collections

from jaxlm import console

RUN_FILE = "wandb_run.json"


def run_id(workdir: pathlib.Path) -> str:
    """The W&B run id of this jaxlm run: read from WORKDIR/wandb_run.json, or made and
    written there (atomically) the first time."""
    path = workdir / RUN_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and isinstance(saved.get("id"), str) and saved["id"]:
            return saved["id"]
    new_id = secrets.token_hex(8)
    partial = path.with_name(f"{RUN_FILE}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"id": new_id}) + "\n")
    os.replace(partial, path)
    return new_id


class WandbWriter:
    def __init__(self, workdir: pathlib.Path, metrics_cfg: ml_collections.ConfigDict,
                 run_config: Mapping[str, Any]):
        import wandb

        self._run = wandb.init(
            project=metrics_cfg.wandb_project, entity=metrics_cfg.wandb_entity or None,
            name=metrics_cfg.wandb_name or workdir.resolve().name, id=run_id(workdir),
            resume="allow", dir=str(workdir), config=dict(run_config),
            mode=metrics_cfg.wandb_mode,
            settings=wandb.Settings(console="off", silent=not console.verbose(),
                                    disable_git=True, save_code=False))
        self._first_new_step = int(self._run.step or 0)  # steps W&B has: 0 .. step - 1

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if step >= self._first_new_step:
            self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()
