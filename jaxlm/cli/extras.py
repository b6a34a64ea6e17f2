"""The optional extras a verb or a config key needs, checked before anything is loaded
(no JAX): one message naming the extra to install."""

from __future__ import annotations

import importlib.util

from jaxlm import errors


def require_harness(what: str) -> None:
    """UserError unless EleutherAI's lm-evaluation-harness is installed (the `eval` extra):
    `jaxlm lm-eval` and train.lm_eval_every."""
    if importlib.util.find_spec("lm_eval") is None:
        raise errors.UserError(f"{what} needs EleutherAI's lm-evaluation-harness: "
                               f"pip install 'jaxlm[eval]'")
