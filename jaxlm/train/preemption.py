"""Preemption: SIGTERM or SIGINT asks the run to stop; it saves what it has and exits 75.

One watch covers a training command from its start-up to its end (`watch()`; the command
line enters it before its first expensive step, the loop enters it again):

- start-up (before the first step: reading data, compiling, restoring): there is nothing
  to save, so the first signal ends the process at once: one line ("nothing to save"), the
  workdir's lock released, exit 75. A handler may not raise there (the main thread may be
  inside a C++ callback), so it exits; the few start-up writes run in `critical()`
  sections, after which a pending signal exits. The compilation runs in a worker thread
  (`responsive`), so the main thread, waiting for it, handles a signal at once rather than
  after the compile.
- the loop, one process: the first signal sets a flag the loop reads after every step (a
  Python bool: no device sync); the loop saves the step in flight, and only that one, and
  exits 75. The handler names that step.
- A second signal aborts at once (`errors.ABORTED`).

Several processes: the decision must be the same on all of them, or one host would save a
step the others never reach. JAX's preemption sync point decides: its handler catches
SIGTERM on any host, the coordination service takes the largest step any host has reached
and every host stops after that step plus one (the processes report their step at every
step: there is no coarser sync interval). jaxlm leaves JAX's SIGTERM handler in place and
passes a first SIGINT on to it as a SIGTERM; a second SIGINT aborts at once. (JAX's handler
ignores a second SIGTERM: abort a multi-host run with SIGINT or SIGKILL.) Once the
multi-host runtime is up, a start-up SIGTERM is held by JAX until the first step, which is
then saved.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterator

import jax
from jax.experimental import multihost_utils

from jaxlm import errors


class PreemptionWatch:
    """The handlers of one training command; see the module doc."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self.in_loop = False
        self.boundary: int | None = None  # the step a signal received now would save
        self.last_step: int | None = None
        self._previous: dict[int, Any] = {}
        self._announced = False
        self._critical = 0
        self._cleanups: list[Callable[[], None]] = []

    @staticmethod
    def _multi_host() -> bool:
        # Without starting a backend: only a started multi-host runtime has several.
        return jax.distributed.is_initialized() and jax.process_count() > 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"\njaxlm: second {name}: aborting without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(errors.ABORTED)
        self.requested = name
        if self._multi_host():  # the first SIGINT becomes the preemption notice
            print(f"\njaxlm: {name} received: passing it on as SIGTERM to JAX's preemption "
                  f"notice; all processes will save the same step (send {name} again to abort "
                  f"at once)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not self.in_loop:
            if not self._critical:
                self._exit_startup()
            return  # exits when the critical section ends
        what = (f"step {self.boundary}" if self.last_step is None or
                self.boundary <= self.last_step else "the last step")
        print(f"\njaxlm: {name} received: finishing {what}, then saving it (send {name} "
              f"again to abort at once)", file=sys.stderr, flush=True)

    def _exit_startup(self) -> None:
        for cleanup in reversed(self._cleanups):
            cleanup()
        sys.stdout.flush()
        print(f"jaxlm: {errors.Preempted(None, signal_name=self.requested)}", file=sys.stderr,
              flush=True)
        os._exit(errors.PREEMPTED)

    def on_startup_exit(self, cleanup: Callable[[], None]) -> None:
        """Runs `cleanup` (e.g. releasing the workdir's lock) if a signal ends the start-up."""
        self._cleanups.append(cleanup)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A start-up step a signal must not cut in half (writing a file): a signal that
        came meanwhile ends the start-up when the block ends."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self.requested is not None and not self.in_loop and not self._critical \
                and not self._multi_host():
            self._exit_startup()

    def start_loop(self, first_step: int, last_step: int) -> None:
        """From here on a signal saves a step instead of ending the start-up."""
        self.boundary, self.last_step = first_step, last_step
        self._cleanups.clear()
        self.in_loop = True

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process."""
        if jax.process_count() == 1:
            stop = self.requested is not None
            self.boundary = step + 1  # a signal from now on is honoured after the next step
            return stop
        stop = multihost_utils.reached_preemption_sync_point(step)
        if stop and not self._announced:
            self._announced = True
            print(f"\njaxlm: preemption notice: all {jax.process_count()} processes save step "
                  f"{step} and exit", file=sys.stderr, flush=True)
        return stop

    def install(self) -> None:
        # A multi-host runtime already up owns SIGTERM (see the module doc); one started
        # later installs its handler over this one.
        signals = (signal.SIGINT,) if self._multi_host() else self.SIGNALS
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._handle:  # not where JAX took it over since
                signal.signal(sig, handler)
        self._previous.clear()


_active: PreemptionWatch | None = None


@contextlib.contextmanager
def watch() -> Iterator[PreemptionWatch]:
    """The command's watch: installed by the outermost `with`, shared by nested ones."""
    global _active
    if _active is not None:
        yield _active
        return
    _active = PreemptionWatch()
    _active.install()
    try:
        yield _active
    finally:
        _active.uninstall()
        _active = None


def responsive(fn: Callable[[], Any]) -> Any:
    """`fn()` in a worker thread, the main thread waiting: a signal handler runs while the
    main thread waits (a thread join is interruptible), not after a long C++ call such as
    XLA's compilation returns. fn's exception is raised here."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name="jaxlm-startup", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
