"""Preemption: SIGTERM or SIGINT asks the loop to finish its step, save and exit.

One process: the first signal sets a flag the loop reads after every step (a Python bool:
no device sync); the loop then writes a checkpoint of the step it finished and exits with
`errors.PREEMPTED`. A second signal aborts at once (`errors.ABORTED`).

Several processes: the decision must be the same on all of them, or one host would save a
step the others never reach. JAX's preemption sync point decides: its handler catches
SIGTERM on any host, the coordination service takes the largest step any host has reached
and every host stops after that step plus one. jaxlm leaves JAX's SIGTERM handler in place
and passes a first SIGINT on to it as a SIGTERM; a second SIGINT aborts at once. (JAX's
handler ignores a second SIGTERM: abort a multi-host run with SIGINT or SIGKILL.)
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import jax
from jax.experimental import multihost_utils

from jaxlm import errors


class PreemptionWatch:
    """Installs the handlers for the duration of a `with` block."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._announced = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"\njaxlm: second {name}: aborting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(errors.ABORTED)
        self.requested = name
        if jax.process_count() > 1:  # the first SIGINT becomes the preemption notice
            print(f"\njaxlm: {name} received: passing it on as SIGTERM to JAX's preemption "
                  f"notice; all processes will save the same step (send {name} again to abort "
                  f"at once)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        print(f"\njaxlm: {name} received: finishing this step, then saving a checkpoint "
              f"(send it again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "PreemptionWatch":
        # Several processes: JAX's coordination service owns SIGTERM (see the module doc).
        signals = self.SIGNALS if jax.process_count() == 1 else (signal.SIGINT,)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process."""
        if jax.process_count() == 1:
            return self.requested is not None
        stop = multihost_utils.reached_preemption_sync_point(step)
        if stop and not self._announced:
            self._announced = True
            print(f"\njaxlm: preemption notice: all {jax.process_count()} processes save step "
                  f"{step} and exit", file=sys.stderr, flush=True)
        return stop
