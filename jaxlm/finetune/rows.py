"""Rows -> batches. Training batches are a pure function of (seed, step): resuming needs no
iterator state, and a resumed run sees exactly the batches an uninterrupted one would.

The rows form an endless stream of epochs, each a seeded permutation of all rows; global
batch k (1-based step) is stream items (k-1)*B .. k*B-1, and each process takes its own rows
of it. Evaluation reads every row once in order, the last batch padded with zero-weight rows.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np

from jaxlm.errors import UserError


class DataChangedError(UserError, ValueError):
    """A resumed run's training rows are not the ones it started with."""


def fingerprint(rows: dict[str, np.ndarray]) -> str:
    """sha256 of the rows' arrays: a resumed run checks its data did not change."""
    h = hashlib.sha256()
    for key in sorted(rows):
        h.update(key.encode())
        h.update(np.ascontiguousarray(rows[key]).tobytes())
    return h.hexdigest()[:16]


class TrainBatches:
    """The training input of a fine-tuning task (jaxlm.train.task.Batches): this process's
    rows of global batch k, for k = 1, 2, ... Its saved state is the step and a fingerprint
    of the rows, so a resume with other data is refused instead of silently continuing."""

    def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int,
                 local_rows: Sequence[int]):
        self.rows = rows
        self.count = len(next(iter(rows.values())))
        self.global_batch = global_batch
        self.seed = seed
        self.local_rows = np.asarray(local_rows, np.int64)
        self.fingerprint = fingerprint(rows)
        self.step = 0  # the last step whose batch was returned
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Row indices of this process's share of the global batch of `step` (1-based)."""
        items = (step - 1) * self.global_batch + self.local_rows
        return np.asarray([self._perm(int(i // self.count))[i % self.count] for i in items],
                          np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        return {k: v[idx] for k, v in self.rows.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        self.step += 1
        return self.batch(self.step)

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.count

    def progress(self, step: int) -> dict[str, float]:
        return {"epoch": self.epoch(step)}

    def get_state(self) -> dict:
        return {"step": self.step, "train_rows_fingerprint": self.fingerprint}

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        return dict(states[0])  # every process is at the same step of the same rows

    def set_state(self, state: dict) -> None:
        if state.get("train_rows_fingerprint") != self.fingerprint:
            raise DataChangedError("the training data changed since this run started: resume "
                                   "it with the same data, or start a new run in another "
                                   "workdir")
        self.step = int(state["step"])

    def close(self) -> None:
        pass


def eval_batches(rows: dict[str, np.ndarray], global_batch: int, local_rows: Sequence[int]
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order; rows past the end are all zeros (weight 0)."""
    count = len(next(iter(rows.values())))
    local = np.asarray(local_rows, np.int64)
    for start in range(0, count, global_batch):
        idx = start + local
        real = idx < count
        yield {k: np.where(real.reshape((-1,) + (1,) * (v.ndim - 1)), v[np.minimum(idx, count - 1)],
                           np.zeros((), v.dtype)).astype(v.dtype)
               for k, v in rows.items()}
