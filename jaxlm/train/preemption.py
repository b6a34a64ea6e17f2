"""Preemption: SIGTERM or SIGINT asks the loop to finish its step, save and exit.

The first signal sets a flag the loop reads after every step (a Python bool: no device
sync); the loop then writes a checkpoint of the step it finished and exits with
`PREEMPTED_EXIT_CODE`. A second signal aborts at once. With several processes the decision
must be the same on all of them, or one host would save a step the others never reach:
JAX's preemption sync point (its coordination service sees the signal on any host and picks
one step for everybody) decides instead, and jaxlm leaves JAX's own SIGTERM handler in
place there.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — the run resumes from its checkpoint
ABORTED_EXIT_CODE = 130  # a second signal: no checkpoint was written


class PreemptionWatch:
    """Installs the handlers for the duration of a `with` block."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"\njaxlm: second {name}: aborting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(ABORTED_EXIT_CODE)
        self.requested = name
        print(f"\njaxlm: {name} received: finishing this step, then saving a checkpoint "
              f"(send it again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "PreemptionWatch":
        if jax.process_count() == 1:  # multi-host: JAX's coordination service listens
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested is not None
