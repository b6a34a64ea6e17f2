"""Telling a damaged checkpoint from a read that may pass, and from a full disk.

A restore that fails is classified by its error (and the errors it was raised from):

- proven damage: a fingerprint mismatch, unparseable JSON, a missing file, TensorStore's
  statuses for missing, truncated or garbled data -> the step is skipped (and set aside by
  the caller), the one before is tried;
- may pass: I/O errors other than a missing file, TensorStore's statuses for an
  unavailable, slow or interrupted store -> retried after RETRY_DELAYS_S, then
  StorageFailure (the checkpoint may be sound: it is not skipped);
- anything else (a bug, running out of memory, a model that does not fit) proves nothing
  about the files and is raised.

Every process of a multi-host run must agree on the outcome of each step, or they would
resume different steps: the outcomes are gathered and the worst counts.
"""

from __future__ import annotations

import errno
import json
import pathlib
import sys
import time
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.errors import StorageFailure, UserError

# Waits before each retry of a read that failed in a way that may pass; then the read
# counts as failed (StorageFailure).
RETRY_DELAYS_S = (1.0, 4.0, 15.0)


class CheckpointMismatchError(UserError, ValueError):
    """The saved tree or shapes differ from what the run expects."""


class CorruptCheckpointError(UserError, ValueError):
    """Files missing or damaged."""


def is_out_of_space(error: BaseException) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text \
                or "os_error_code='28'" in text:
            return True
    return False


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# Errors that may pass: I/O errors other than a missing file, and TensorStore's statuses for
# an unavailable, slow or interrupted store.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY, errno.ESTALE,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ENETDOWN, errno.ENETUNREACH,
                     errno.EHOSTUNREACH, errno.EINTR}
_TRANSIENT_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")


def _is_transient(error: BaseException) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if str(e).startswith(_TRANSIENT_STATUSES) or "Input/output error" in str(e):
            return True
    return False


# Proof that files are damaged: a fingerprint mismatch, unparseable JSON, a missing file, or
# TensorStore's statuses for missing, truncated or garbled data.
_DAMAGE_STATUSES = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                    "INVALID_ARGUMENT")
_DAMAGE_WORDS = ("does not exist", "not found", "No such file", "Not enough data")


def _is_damage(error: BaseException) -> bool:
    for e in _chain(error):
        if isinstance(e, (CorruptCheckpointError, FileNotFoundError, NotADirectoryError,
                          UnicodeDecodeError, json.JSONDecodeError)):
            return True
        text = str(e)
        if text.startswith(_DAMAGE_STATUSES) or any(w in text for w in _DAMAGE_WORDS):
            return True
    return False


def _restore_with_retries(step_dir: pathlib.Path, restore_one
                          ) -> tuple[Any, BaseException | None, bool]:
    """(result, error, transient) of restoring `step_dir`, retrying errors that may pass."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return restore_one(step_dir), None, False
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
                raise  # out of memory: not the files' fault
            if not _is_transient(e):
                if _is_damage(e):
                    return None, e, False
                raise  # neither: a failure that proves nothing about the files
            if delay is None:
                return None, e, True
            warn(f"reading checkpoint {step_dir} failed ({_reason(e)}); retrying in "
                  f"{delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"


def newest_good(step_dirs: list[pathlib.Path], restore_one) -> tuple[Any, list]:
    """`restore_one` of the first step directory that restores on every process, and the
    (directory, reason) of the damaged ones before it. A model mismatch or running out of
    memory is raised: neither means the files are damaged. A read that kept failing in a
    way that may pass (I/O errors, an unavailable store) is retried with backoff, then
    raised as StorageFailure: the checkpoint may be sound, so it is not skipped."""
    failed = []
    for step_dir in step_dirs:
        result, error, transient = _restore_with_retries(step_dir, restore_one)
        # 0 restored, 1 damaged, 2 unreadable for now: every process must agree, or they
        # would resume different steps.
        outcome = 0 if error is None else (2 if transient else 1)
        if jax.process_count() > 1:
            outcome = int(np.max(multihost_utils.process_allgather(np.asarray(outcome))))
        if outcome == 0:
            return result, failed
        reason = _reason(error) if error else "failed on another process"
        if outcome == 2:
            raise StorageFailure(f"cannot read checkpoint {step_dir} after "
                                 f"{len(RETRY_DELAYS_S) + 1} tries ({reason}); nothing was "
                                 f"changed: run the same command again when the storage is "
                                 f"back")
        warn(f"checkpoint {step_dir} is damaged ({reason}); trying the one before")
        failed.append((step_dir, reason))
    return None, failed


def warn(message: str) -> None:
    """One line on stderr (process 0); not also through `logging`, whose root handler some
    libraries set up would print it twice."""
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
