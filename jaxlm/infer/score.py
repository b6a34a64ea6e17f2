"""Log-likelihood scoring: what multiple-choice benchmarks need.

`score(model, tokenizer, context, continuation)` gives the summed log-probability of the
continuation's tokens given the context, and whether each of them is the model's argmax
(the continuation is the greedy one). Lists of
contexts and continuations are scored in batches. The context is encoded as a document
start ([BOS] + ids, as the pipeline does) and the continuation separately, then joined, so
write the separating space at the start of the continuation (" Paris").
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError
from jaxlm.infer.generate import encode_prompt


class ScoringError(UserError, ValueError):
    """A request that cannot be scored; the message names its index."""


@functools.lru_cache(maxsize=8)
def _token_scorer(graphdef):
    """Jitted: per target token, its log-probability and whether it is the argmax."""
    def fn(state, inputs_BxL, targets_BxL, positions_BxL, segment_ids_BxL):
        logits_BxLxV = nnx.merge(graphdef, state)(inputs_BxL, positions_BxL, segment_ids_BxL)
        log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
        target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        is_argmax_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
        return target_BxL - log_z_BxL, is_argmax_BxL
    return jax.jit(fn)


def score_tokens(model: nnx.Module, contexts: Sequence[Sequence[int]],
                 continuations: Sequence[Sequence[int]], batch_size: int = 8
                 ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token | everything before it), all of them argmax) for
    each (context ids, continuation ids). Rows are right-padded to a power-of-two length
    (one compilation serves many lengths); padding is its own segment, never attended."""
    if len(contexts) != len(continuations):
        raise ScoringError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    limit, vocab = model.cfg.max_seq_len, model.cfg.vocab_size
    rows = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        ctx, cont = np.asarray(ctx, np.int64).reshape(-1), np.asarray(cont, np.int64).reshape(-1)
        if ctx.size == 0:
            raise ScoringError(f"request {i}: empty context (nothing to condition the first "
                               f"continuation token on; a tokenizer with BOS gives one)")
        if cont.size == 0:
            raise ScoringError(f"request {i}: empty continuation")
        ids = np.concatenate([ctx, cont])
        if ids.min() < 0 or ids.max() >= vocab:
            raise ScoringError(f"request {i}: a token id is outside the vocabulary [0, {vocab})")
        if ids.size - 1 > limit:
            raise ScoringError(f"request {i}: context + continuation is {ids.size} tokens; the "
                               f"model scores at most {limit + 1} (model.max_seq_len + 1); "
                               f"nothing is truncated")
        rows.append((ids, cont.size))
    graphdef, state = nnx.split(model)
    scorer = _token_scorer(graphdef)
    results: list[tuple[float, bool]] = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin:begin + batch_size]
        longest = max(ids.size - 1 for ids, _ in chunk)
        length = min(max(16, 1 << (longest - 1).bit_length()), max(limit, longest))
        shape = (batch_size, length)
        inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        for r, (ids, _) in enumerate(chunk):
            n = ids.size - 1
            inputs[r, :n], targets[r, :n] = ids[:-1], ids[1:]
            positions[r, :n], segments[r, :n] = np.arange(n), 1
        logp, greedy = jax.device_get(scorer(state, inputs, targets, positions, segments))
        for r, (ids, n_cont) in enumerate(chunk):
            n = ids.size - 1
            span = slice(n - n_cont, n)
            results.append((math.fsum(logp[r, span].astype(np.float64)),
                            bool(np.all(greedy[r, span]))))
    return results


def score(model: nnx.Module, tokenizer, context: str | Sequence[str],
          continuation: str | Sequence[str], batch_size: int = 8):
    """(logprob_sum, is_greedy) of `continuation` after `context`; for lists of contexts and
    continuations (same length; e.g. one context repeated per choice) a list of them."""
    single = isinstance(context, str)
    if single != isinstance(continuation, str):
        raise ScoringError("context and continuation must both be strings or both be lists")
    contexts = [context] if single else list(context)
    continuations = [continuation] if single else list(continuation)
    ctx_ids = [encode_prompt(tokenizer, c) for c in contexts]
    cont_ids = [np.asarray(tokenizer.encode(c), np.int32) for c in continuations]
    results = score_tokens(model, ctx_ids, cont_ids, batch_size)
    return results[0] if single else results
