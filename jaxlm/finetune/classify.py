"""The classification head: pooled final hidden states -> num_labels logits.

Pooling: "last" takes the last non-padding token of the row (with the data's EOS there, a
summary position a causal model can attend all of the text from); "first" the row's first
real token (an encoder's [CLS]: the tokenizer's start token, which attends to the whole
text in both directions); "mean" averages the hidden states of the row's real tokens.
Token types (an encoder's segment A/B embedding) are left at their default, 0. The head is a float32 matrix (D x C) and bias (C),
trained in every method (with LoRA: adapters + head).

Batch (one example per row, see classify_data.py): inputs, positions, segment_ids (1 real,
0 padding) of B x L, labels (B, int32) and label_weights (B, float32; 0 for padding rows).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

HEAD_AXES = {"w": ("embed", None), "b": (None,)}
ROW_KEYS = ("labels", "label_weights")  # per-row arrays; the rest are B x L


def init_head(key: jax.Array, d_model: int, num_labels: int, std: float) -> dict[str, jax.Array]:
    return {"w": std * jax.random.normal(key, (d_model, num_labels), jnp.float32),
            "b": jnp.zeros((num_labels,), jnp.float32)}


def pool(hidden_BxLxD: jax.Array, segment_ids_BxL: jax.Array, pooling: str) -> jax.Array:
    """float32 B x D: the last or the first real token's state, or the mean over real
    tokens."""
    real_BxL = segment_ids_BxL > 0
    hidden = hidden_BxLxD.astype(jnp.float32)
    if pooling == "mean":
        count_Bx1 = jnp.maximum(jnp.sum(real_BxL, axis=1, keepdims=True), 1)
        return jnp.sum(jnp.where(real_BxL[..., None], hidden, 0.0), axis=1) / count_Bx1
    length = segment_ids_BxL.shape[1]
    if pooling == "first":
        first_B = jnp.argmax(real_BxL, axis=1)  # 0 for a row of padding only
        return jnp.take_along_axis(hidden, first_B[:, None, None], axis=1)[:, 0]
    last_B = jnp.max(jnp.where(real_BxL, jnp.arange(length), 0), axis=1)
    return jnp.take_along_axis(hidden, last_B[:, None, None], axis=1)[:, 0]


def logits(graphdef: Any, params: Any, head: dict, batch: dict, pooling: str) -> jax.Array:
    """float32 B x C."""
    model = nnx.merge(graphdef, params)
    hidden_BxLxD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    pooled_BxD = pool(hidden_BxLxD, batch["segment_ids"], pooling)
    return pooled_BxD @ head["w"] + head["b"]


def loss_sums(graphdef: Any, params: Any, head: dict, batch: dict, pooling: str
              ) -> tuple[jax.Array, dict]:
    """Summed cross-entropy over the batch's real rows, and the sums the step reports."""
    logits_BxC = logits(graphdef, params, head, batch, pooling)
    labels_B = batch["labels"]
    weights_B = batch["label_weights"].astype(jnp.float32)
    nll_B = jax.nn.logsumexp(logits_BxC, axis=-1) - jnp.take_along_axis(
        logits_BxC, labels_B[:, None], axis=-1)[:, 0]
    ce_sum = jnp.sum(nll_B * weights_B)
    correct = jnp.sum((jnp.argmax(logits_BxC, axis=-1) == labels_B) * weights_B)
    return ce_sum, {"ce_sum": ce_sum, "correct_sum": correct, "weight_sum": jnp.sum(weights_B)}


def metrics(sums: dict, denom: jax.Array) -> dict:
    """What a classification step reports: mean loss and accuracy over the batch's rows."""
    return {"loss": sums["ce_sum"] / denom, "accuracy": sums["correct_sum"] / denom,
            "examples": sums["weight_sum"]}


def figures(totals: dict[str, float], batches: int) -> dict[str, float]:
    """Loss and accuracy over every evaluated row (sums added in float64 on the host)."""
    denom = max(totals["weight_sum"], 1.0)
    return {"loss": totals["ce_sum"] / denom, "accuracy": totals["correct_sum"] / denom,
            "examples": totals["weight_sum"], "batches": batches}
