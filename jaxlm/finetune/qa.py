"""Extractive question answering on an encoder: a span head over the final hidden states,
its loss, the best span and the figures.

The head is a float32 D x 2 matrix and bias (2) (columns: start, end), a trainable group
like the classifier's head (classify.HEAD_AXES), trained in every method. Only context
positions compete: the logits elsewhere are set to NEG before any softmax or argmax. Loss
of a row: the mean of the start and end cross-entropies over its context positions.
Prediction: the span start <= end <= start + max_answer_tokens - 1, both inside the
context, that maximises start logit + end logit (as BERT's SQuAD evaluation, without its
n-best pre-filter: every valid pair is scored).

Batch (one example per row, see qa_data.py): inputs, positions, segment_ids, token_types,
context_mask (B x L, int32) and starts, ends (B, int32), label_weights (B, float32; 0 for
padding rows).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

HEAD_OUTPUTS = 2  # start, end
NEG = -1e9  # the logit of a position outside the context


def span_logits(graphdef: Any, params: Any, head: dict, batch: dict
                ) -> tuple[jax.Array, jax.Array]:
    """float32 (start B x L, end B x L), NEG outside the context."""
    model = nnx.merge(graphdef, params)
    hidden_BxLxD = model.hidden_states(batch["inputs"], batch["positions"],
                                       batch["segment_ids"], batch["token_types"])
    logits_BxLx2 = jnp.einsum("bld,dk->blk", hidden_BxLxD.astype(jnp.float32),
                              head["w"]) + head["b"]
    context_BxL = batch["context_mask"] > 0
    logits_BxLx2 = jnp.where(context_BxL[..., None], logits_BxLx2, NEG)
    return logits_BxLx2[..., 0], logits_BxLx2[..., 1]


def _nll(logits_BxL: jax.Array, target_B: jax.Array) -> jax.Array:
    return jax.nn.logsumexp(logits_BxL, axis=-1) - jnp.take_along_axis(
        logits_BxL, target_B[:, None], axis=-1)[:, 0]


def loss_sums_of(start_BxL: jax.Array, end_BxL: jax.Array, batch: dict
                 ) -> tuple[jax.Array, dict]:
    weights_B = batch["label_weights"].astype(jnp.float32)
    nll_B = 0.5 * (_nll(start_BxL, batch["starts"]) + _nll(end_BxL, batch["ends"]))
    ce_sum = jnp.sum(nll_B * weights_B)
    both_B = (jnp.argmax(start_BxL, axis=-1) == batch["starts"]) & \
        (jnp.argmax(end_BxL, axis=-1) == batch["ends"])
    return ce_sum, {"ce_sum": ce_sum, "correct_sum": jnp.sum(both_B * weights_B),
                    "weight_sum": jnp.sum(weights_B)}


def loss_sums(graphdef: Any, params: Any, head: dict, batch: dict) -> tuple[jax.Array, dict]:
    """Summed loss over the batch's real rows and the sums the step reports (correct_sum:
    rows whose start and end argmaxes are both the answer's)."""
    return loss_sums_of(*span_logits(graphdef, params, head, batch), batch)


def best_spans(start_BxL: jax.Array, end_BxL: jax.Array, context_BxL: jax.Array,
               max_answer_tokens: int) -> tuple[jax.Array, jax.Array]:
    """int32 (start B, end B) of the best valid span of each row (module docstring)."""
    length = start_BxL.shape[1]
    s_L, e_L = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    allowed_LxL = (e_L >= s_L) & (e_L - s_L < max_answer_tokens)
    context = context_BxL > 0
    valid_BxLxL = allowed_LxL[None] & context[:, :, None] & context[:, None, :]
    score_BxLxL = jnp.where(valid_BxLxL, start_BxL[:, :, None] + end_BxL[:, None, :], -jnp.inf)
    flat_B = jnp.argmax(score_BxLxL.reshape(score_BxLxL.shape[0], -1), axis=-1)
    return (flat_B // length).astype(jnp.int32), (flat_B % length).astype(jnp.int32)


def metrics(sums: dict, denom: jax.Array) -> dict:
    """What a QA step reports: mean loss, and the share of rows whose start and end
    argmaxes are both right ("accuracy")."""
    return {"loss": sums["ce_sum"] / denom, "accuracy": sums["correct_sum"] / denom,
            "examples": sums["weight_sum"]}
