"""Beam search on device, step for step as Hugging Face transformers' beam search (the
vectorised `_beam_search` of GenerationMixin, the successor of `BeamSearchScorer`; tested
against transformers 5), so the same model gives the same sequences.

    beam = Beam(4, length_penalty=0.6)
    tokens_BxL, lengths_B, scores_B = search(step, reorder, cache, start_R, stop_ids,
                                             beam.scoring(), num_beams=beam.num_beams,
                                             batch=B, max_new_tokens=L, n_stop_ids=1)

`step(tokens_R, cache) -> (float32 logits R x V, cache)` runs the decoder one token for the
R = B x num_beams rows (the beams of example b are rows b*num_beams ...); `reorder(cache,
rows_R)` gathers cache rows. The whole search is one `lax.while_loop` (call it under jit).

Per step, as transformers does: every beam's log-softmax plus its running score; the best
K = max(2, 1 + number of stop ids) x num_beams of the num_beams x V continuations; those
that end (a stop id, or the max_new_tokens-th token) among the first num_beams of the K are
finished hypotheses scored sum_logprobs / (length ** length_penalty), where length counts
the generated tokens including the stop token (not the decoder start); the best num_beams
continuations that do not end are the next running beams. An example stops adding
hypotheses once it cannot improve: early_stopping True: num_beams finished hypotheses;
False: the best running beam's score over the current length cannot beat the worst finished
one; "never": the same over max_new_tokens when length_penalty > 0 (the canonical bound).
The loop ends when no example can improve, or (early_stopping True) every beam of every
example finished, or every continuation ended. The result is each example's best finished
hypothesis; scores use the -1e9 masking constants of transformers, in float32, so that the
same ties fall the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.errors import UserError

MASKED = -1.0e9  # transformers' score of beams that must not be chosen


class BeamError(UserError, ValueError):
    """A bad beam-search setting; the message names it."""


@dataclasses.dataclass(frozen=True)
class Beam:
    num_beams: int = 4
    length_penalty: float = 1.0  # finished score: sum_logprobs / length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never" (transformers' meanings)

    def __post_init__(self):
        if isinstance(self.num_beams, bool) or int(self.num_beams) != self.num_beams \
                or self.num_beams < 1:
            raise BeamError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.early_stopping not in (True, False, "never"):
            raise BeamError(f"early_stopping must be true, false or 'never', got "
                            f"{self.early_stopping!r}")
        if not float("-inf") < float(self.length_penalty) < float("inf"):
            raise BeamError(f"length_penalty must be a finite number, got {self.length_penalty}")

    def scoring(self) -> dict[str, jax.Array]:
        """length_penalty and early_stopping as arrays: traced, so that changing them does
        not compile the search again (num_beams sets its shapes: it is static)."""
        return {"length_penalty": jnp.float32(self.length_penalty),
                "stop_early": jnp.bool_(self.early_stopping is True),
                "never": jnp.bool_(self.early_stopping == "never")}

    def candidates(self, n_stop_ids: int) -> int:
        """K: continuations kept per example and step (enough that num_beams of them go on
        even when every beam's best continuation is a stop id)."""
        return max(2, 1 + n_stop_ids) * self.num_beams


def _gather(x_BxKx: jax.Array, index_BxN: jax.Array) -> jax.Array:
    """Rows `index` of each example: x[b, index[b, n], ...]."""
    index = index_BxN.reshape(index_BxN.shape + (1,) * (x_BxKx.ndim - 2))
    return jnp.take_along_axis(x_BxKx, index, axis=1)


def search(step: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
           reorder: Callable[[Any, jax.Array], Any], cache: Any, start_R: jax.Array,
           stop_ids: jax.Array, scoring: dict[str, jax.Array], *, num_beams: int, batch: int,
           max_new_tokens: int, n_stop_ids: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(int32 tokens B x max_new_tokens: each example's best hypothesis, zeros after it;
    int32 lengths B, the stop token included; float32 scores B, length-penalised).
    `stop_ids` holds n_stop_ids ids (or a single -1 when there are none); `scoring` is
    Beam.scoring()."""
    b, nb, steps = batch, num_beams, max_new_tokens
    k = Beam(num_beams).candidates(n_stop_ids)
    lp, stop_early = scoring["length_penalty"], scoring["stop_early"]
    top_beams_K = jnp.arange(k) < nb

    def one_step(carry):
        (t, cache, last_R, run_seq_BxNxL, run_scores_BxN, seq_BxNxL, scores_BxN, len_BxN,
         finished_BxN, open_Bx1, _) = carry
        logits_RxV, cache = step(last_R, cache)
        vocab = logits_RxV.shape[-1]
        logp_BxNxV = jax.nn.log_softmax(logits_RxV.astype(jnp.float32), axis=-1).reshape(
            b, nb, vocab) + run_scores_BxN[:, :, None]
        top_lp_BxK, top_index_BxK = jax.lax.top_k(logp_BxNxV.reshape(b, nb * vocab), k)
        parent_BxK = top_index_BxK // vocab
        token_BxK = (top_index_BxK % vocab).astype(jnp.int32)
        top_seq_BxKxL = _gather(run_seq_BxNxL, parent_BxK).at[:, :, t].set(token_BxK)
        ends_BxK = jnp.isin(token_BxK, stop_ids) | (t + 1 >= steps)

        # The best continuations that do not end run on.
        run_lp_BxK = top_lp_BxK + ends_BxK.astype(jnp.float32) * MASKED
        next_BxN = jax.lax.top_k(run_lp_BxK, nb)[1]
        run_seq_BxNxL = _gather(top_seq_BxKxL, next_BxN)
        run_scores_BxN = _gather(run_lp_BxK, next_BxN)
        parent_BxN = _gather(parent_BxK, next_BxN)

        # Those that end among the first num_beams become hypotheses, if they beat the kept.
        just_BxK = ends_BxK & top_beams_K[None, :]
        fin_lp_BxK = top_lp_BxK / ((t + 1).astype(jnp.float32) ** lp)
        full_Bx1 = jnp.all(finished_BxN, axis=-1, keepdims=True) & stop_early
        fin_lp_BxK += full_Bx1.astype(jnp.float32) * MASKED
        fin_lp_BxK += (~open_Bx1).astype(jnp.float32) * MASKED
        fin_lp_BxK += (~just_BxK).astype(jnp.float32) * MASKED
        merged_scores = jnp.concatenate([scores_BxN, fin_lp_BxK], axis=1)
        keep_BxN = jax.lax.top_k(merged_scores, nb)[1]
        seq_BxNxL = _gather(jnp.concatenate([seq_BxNxL, top_seq_BxKxL], axis=1), keep_BxN)
        scores_BxN = _gather(merged_scores, keep_BxN)
        len_BxN = _gather(jnp.concatenate(
            [len_BxN, jnp.broadcast_to(t + 1, (b, k)).astype(jnp.int32)], axis=1), keep_BxN)
        finished_BxN = _gather(jnp.concatenate([finished_BxN, just_BxK], axis=1), keep_BxN)

        rows_R = (jnp.arange(b, dtype=jnp.int32)[:, None] * nb + parent_BxN).reshape(-1)
        cache = reorder(cache, rows_R)
        last_R = run_seq_BxNxL[:, :, t].reshape(-1)

        # Can an example still improve on its finished hypotheses?
        best_length = jnp.where(scoring["never"] & (lp > 0), jnp.float32(steps),
                                (t + 1).astype(jnp.float32))
        best_Bx1 = run_scores_BxN[:, :1] / best_length ** lp
        worst_BxN = jnp.where(finished_BxN, jnp.min(scores_BxN, axis=1, keepdims=True), MASKED)
        open_Bx1 = open_Bx1 & jnp.any(best_Bx1 > worst_BxN, axis=-1, keepdims=True)
        going = jnp.any(open_Bx1) & ~(jnp.all(finished_BxN) & stop_early) & ~jnp.all(ends_BxK)
        return (t + 1, cache, last_R, run_seq_BxNxL, run_scores_BxN, seq_BxNxL, scores_BxN,
                len_BxN, finished_BxN, open_Bx1, going)

    # Only the first beam of each example starts live: the others would repeat it.
    run_scores = jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(MASKED)
    seq = jnp.zeros((b, nb, steps), jnp.int32)
    start = (jnp.int32(0), cache, start_R.astype(jnp.int32), seq, run_scores, seq,
             jnp.full((b, nb), MASKED, jnp.float32), jnp.zeros((b, nb), jnp.int32),
             jnp.zeros((b, nb), bool), jnp.ones((b, 1), bool), jnp.bool_(True))
    out = jax.lax.while_loop(lambda c: c[-1], one_step, start)
    seq_BxNxL, scores_BxN, len_BxN = out[5], out[6], out[7]
    return seq_BxNxL[:, 0], len_BxN[:, 0], scores_BxN[:, 0]
