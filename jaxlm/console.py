"""What a command shows: jaxlm's own lines, and library chatter only when asked.

Libraries announce themselves on a CPU machine in ways that read as failures: libtpu's
start-up warnings when no TPU is present, TFDS's "Downloading and preparing dataset" and
progress bars while jaxlm builds a local source (nothing is downloaded), absl and Orbax
notices. By default jaxlm keeps them out of the output; `jaxlm --verbose ...` (which sets
JAXLM_VERBOSE=1, inherited by every process a command starts) lets everything through.
Nothing is hidden when it matters: output captured from a step that then fails is printed
with the failure.

Owns: the verbosity switch and the ways chatter is held back (native output of a block or
native stdout for good, Python output of a block, library loggers). Imports nothing from jaxlm.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import traceback
from typing import Iterator

VERBOSE_ENV = "JAXLM_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose() -> None:
    os.environ[VERBOSE_ENV] = "1"


@contextlib.contextmanager
def native_output_held() -> Iterator[None]:
    """What native code (libtpu, XLA, Gloo) writes to the process's stderr during the
    block goes to a temporary file; Python's own writes (warnings, logging) still reach
    the terminal. Printed after all if the block raises."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    saved_stream = sys.stderr
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(saved_fd), "wb"), write_through=True)
        try:
            yield
        except BaseException:
            _restore(saved_fd, saved_stream)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            sys.stderr.flush()
            raise
        else:
            _restore(saved_fd, saved_stream)


def _restore(saved_fd: int, saved_stream) -> None:
    replacement = sys.stderr
    sys.stderr = saved_stream
    replacement.close()
    os.dup2(saved_fd, 2)
    os.close(saved_fd)


def drop_native_stdout() -> None:
    """From now on, what native code writes to the process's stdout is dropped; Python's
    prints still reach it. Native libraries write their errors to stderr: on stdout they
    only chat (Gloo prints a connection note per communicator, dozens per multi-process
    run on CPU, from several threads at once)."""
    if verbose():
        return
    sys.stdout.flush()
    real = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = io.TextIOWrapper(os.fdopen(real, "wb"), line_buffering=True,
                                  encoding=sys.stdout.encoding, errors=sys.stdout.errors)


@contextlib.contextmanager
def python_output_held() -> Iterator[None]:
    """Python-level prints and progress bars (sys.stdout, sys.stderr) of the block held
    back; printed after all if the block raises."""
    if verbose():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def quiet_libraries() -> None:
    """Library logs (absl's: Orbax's background-thread errors with their tracebacks, its
    notices) stay out of a command's output: what they report reaches the user as jaxlm's
    own line (a storage failure, a damaged checkpoint)."""
    if verbose():
        return
    for name in ("absl", "asyncio"):  # asyncio: Orbax's failed background writes
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)


def _without_closed_loop_callbacks(hook):
    """TensorStore completes the writes of a save that already failed on other threads;
    each callback's "Event loop is closed" (asyncio) reaches sys.unraisablehook. Those,
    and only those, are dropped."""

    def unraisablehook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if unraisable.exc_type is RuntimeError and \
                str(unraisable.exc_value) == "Event loop is closed" and frames and \
                frames[0].name == "call_soon_threadsafe":
            return
        hook(unraisable)

    return unraisablehook
