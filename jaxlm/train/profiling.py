"""A jax.profiler trace of a window of training steps (`train.profile_steps=START:COUNT`).

The trace of steps START .. START+COUNT-1 goes to <workdir>/profile/plugins/profile/<time>/
(`<host>.xplane.pb` for TensorBoard's profile plugin and XProf, `perfetto_trace.json.gz` for
ui.perfetto.dev), written by process 0 only unless train.profile_all_processes. Each step
is annotated (jax.profiler.StepTraceAnnotation "train", step_num) so the tools show step
boundaries. The loop asks for a `Window` only when profiling is on: a run without it never
calls the profiler.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from jaxlm import config as config_lib


class Window:
    """Starts the trace before step `first`, stops it after step `last` has finished."""

    def __init__(self, directory: pathlib.Path, first: int, last: int, say: Callable):
        self.directory, self.first, self.last, self.say = directory, first, last, say
        self.active = False

    def step(self, step: int) -> contextlib.AbstractContextManager:
        """Around the dispatch of `step`: starts the trace at the window's first step and
        annotates the steps inside it."""
        if step == self.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True
        if self.active:
            return jax.profiler.StepTraceAnnotation("train", step_num=step)
        return contextlib.nullcontext()

    def after(self, step: int, state: Any) -> None:
        """After `step` was dispatched: at the window's last step, waits for it and stops."""
        if self.active and step == self.last:
            jax.block_until_ready(state)
            self.stop()
            self.say(f"profile of steps {self.first}-{self.last} written to {self.directory} "
                     f"(tensorboard --logdir {self.directory}, or perfetto_trace.json.gz in "
                     f"ui.perfetto.dev)")

    def stop(self) -> None:
        """Stops a trace in progress (also when the run ends inside the window)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def window(train_cfg: ml_collections.ConfigDict, workdir: pathlib.Path, first_step: int,
           say: Callable) -> Window | None:
    """The profile window of this attempt, or None (profiling off, not this process, or the
    window was passed before the checkpoint this attempt resumes from). A window the resume
    point cuts is profiled from the first step this attempt runs."""
    span = config_lib.profile_window(train_cfg.profile_steps)
    if span is None or not (train_cfg.profile_all_processes or jax.process_index() == 0):
        return None
    start, count = span
    first, last = max(start, first_step), start + count - 1
    if first > last:
        say(f"train.profile_steps={train_cfg.profile_steps}: those steps were done before the "
            f"checkpoint this run resumes from; nothing to profile")
        return None
    return Window(workdir / "profile", first, last, say)
