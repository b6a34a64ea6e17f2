"""User errors and the exit-code table: the one place a failure becomes an exit status.

Owns: `UserError` (the base of every "bad input" error: a config key, a file, a flag, a
checkpoint that does not fit) and `ConfigError` (a config key), the outcomes a run reports
by exit code (`NonFiniteLoss`, `StorageFailure`, `Preempted`), `EXIT_CODES` and
`exit_code()`. Imports nothing (neither jaxlm nor JAX), so
every package may raise these.

A bad input is reported as one line naming what is wrong, and the command exits 2 before
anything expensive starts. Each package defines its own subclasses of `UserError` where a
caller needs to tell them apart (`ConfigError`, `SourceError`, ...); the command line
catches the base class only.
"""

from __future__ import annotations

import pathlib

DONE = 0
PYTHON_ERROR = 1
BAD_INPUT = 2
NONFINITE = 3
STORAGE = 74  # EX_IOERR: checkpoint storage failed mid-run
PREEMPTED = 75  # EX_TEMPFAIL: "try again" - the run resumes from its checkpoint
ABORTED = 130  # a second signal: no checkpoint was written
LOST_PEER = 134  # SIGABRT: JAX's coordination service ended this process (another was lost)

# What each exit status of a jaxlm command means: (short form, what to know). The README's
# "Exit codes" table says the same; a test holds the two together.
EXIT_CODES = {
    DONE: ("done", "done"),
    PYTHON_ERROR: ("error", "a Python error (multi-host: this process left at once; the others "
                            "stop within the heartbeat timeout)"),
    BAD_INPUT: ("bad input", "bad input (config, data source, start-up flags, checkpoint, "
                             "unwritable directory, another run holding the workdir, a resume "
                             "the run's config or tokenizer forbids)"),
    NONFINITE: ("non-finite loss", "non-finite loss under `train.nonfinite=stop` (the last "
                                   "good checkpoint is kept)"),
    STORAGE: ("storage failed", "checkpoint storage failed mid-run: no space left, or reads "
                                "that kept failing after retries; every complete checkpoint "
                                "is kept: fix the storage and run the same command again"),
    PREEMPTED: ("preempted, checkpoint saved", "preempted (SIGTERM/SIGINT): the checkpoint of "
                "the step all processes agreed on was saved (before the first step: nothing "
                "to save); run the same command again to resume"),
    ABORTED: ("aborted by a second signal", "a second signal aborted without a checkpoint"),
    LOST_PEER: ("lost a peer", "JAX's coordination service ended this process because "
                               "another process was lost"),
}

class UserError(Exception):
    """Bad input: a config value, a file, a flag or a checkpoint. The message names it and
    is shown as one line; the command exits BAD_INPUT."""


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the key (`config.section.key`)."""


class NonFiniteLoss(Exception):
    """A non-finite loss or gradient under train.nonfinite="stop"; exits NONFINITE."""


class StorageFailure(Exception):
    """Checkpoint storage failed mid-run (no space left, or reads kept failing); exits
    STORAGE. Every complete checkpoint is kept."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving `step` (None: during start-up, with
    nothing to save); exits PREEMPTED, and running the same command again resumes."""

    def __init__(self, step: int | None, path: pathlib.Path | str | None = None,
                 signal_name: str = "SIGTERM"):
        if step is None:
            message = (f"preempted ({signal_name}) during start-up, before the first step: "
                       f"nothing to save; run the same command again to start")
        else:
            message = (f"preempted: checkpoint of step {step} saved at {path}; run the same "
                       f"command again to resume")
        super().__init__(message)
        self.step = step


def exit_code(error: BaseException) -> int | None:
    """The exit status of an error a command reports as one line, or None for an error
    that is a bug (it propagates with its traceback, exit PYTHON_ERROR)."""
    if isinstance(error, (UserError, FileNotFoundError)):
        return BAD_INPUT
    if isinstance(error, NonFiniteLoss):
        return NONFINITE
    if isinstance(error, Preempted):
        return PREEMPTED
    if isinstance(error, StorageFailure):
        return STORAGE
    return None


def describe(code: int) -> str:
    """'code 75 (preempted, checkpoint saved)' for a process's exit status; a negative
    status is a process killed by that signal."""
    import signal
    if code < 0:
        try:
            return f"code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"code {code} (killed by signal {-code})"
    return f"code {code} ({EXIT_CODES[code][0]})" if code in EXIT_CODES else f"code {code}"
