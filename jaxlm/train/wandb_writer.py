"""Weights & Biases logging beside metrics.jsonl and TensorBoard (`metrics.wandb=true`).

One W&B run per jaxlm run: its id is kept in WORKDIR/wandb_run.json, so a resumed run
continues the same W&B run (`resume="allow"`); a run that starts from step 0 (a first
attempt that never saved, `checkpoint.on_all_corrupt=restart`) gets a new id. Logged: the
same scalars as metrics.jsonl at the same steps, and the full config. A resumed run does
not log again the steps W&B already has (the rows a resume supersedes in metrics.jsonl: a
resume is bit-exact, so they hold the same values, unless the resume changed settings with
train.allow_config_change; then W&B keeps the first values and metrics.jsonl, with
metrics.superseded.jsonl, says what happened). Offline mode (`metrics.wandb_mode="offline"`) writes under
WORKDIR/wandb/ and needs no network; `wandb sync WORKDIR/wandb/offline-run-*` uploads it.
W&B's console capture is off (jaxlm prints its own progress); its notices show with
--verbose only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import secrets
from typing import Any, Mapping

import ml_collections

from jaxlm import console
from jaxlm.errors import ConfigError

RUN_FILE = "wandb_run.json"


def check_installed(metrics_cfg: ml_collections.ConfigDict) -> None:
    """Before a run starts: metrics.wandb needs the package (reading a run that logged to
    W&B does not)."""
    if metrics_cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError('config.metrics.wandb: true needs the wandb package: '
                          'pip install -e ".[wandb]"')


def run_id(workdir: pathlib.Path, fresh: bool) -> str:
    """The W&B run id of this jaxlm run: read from WORKDIR/wandb_run.json, or (the first
    time, or `fresh`: the run starts from step 0) made and written there atomically."""
    path = workdir / RUN_FILE
    if path.exists() and not fresh:
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
                 run_config: Mapping[str, Any], resumed_step: int | None):
        import wandb

        self._run = wandb.init(
            project=metrics_cfg.wandb_project, entity=metrics_cfg.wandb_entity or None,
            name=metrics_cfg.wandb_name or workdir.resolve().name,
            id=run_id(workdir, fresh=resumed_step is None),
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
