"""Preference tuning's objective (finetune.task=dpo): DPO, or ORPO with finetune.orpo.

For a pair (prompt x, chosen y_w, rejected y_l), log pi(y | x) is the summed log-probability
of the reply's trained tokens (preference_data), under the policy being trained and under
the frozen reference (the base: with LoRA the base without its adapters, so there is no
second copy of the weights).

    DPO   z = beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))
          loss = -log sigmoid(z)                     (log 2 while the policy is the reference)
          rewards: beta * (log pi(y) - log ref(y)); accuracy: the share of pairs with z > 0
    ORPO  no reference. With m(y) = log pi(y) / |y| (mean over the reply's tokens) and
          log odds(y) = m(y) - log(1 - exp(m(y))):
          z = log odds(y_w) - log odds(y_l)
          loss = -m(y_w) + beta * -log sigmoid(z)    (SFT on the chosen reply + odds ratio)
          rewards: beta * m(y); accuracy: the share of pairs with z > 0

Sums over the batch's pairs (pair_weights 0 for padding): "ce_sum" is the summed loss and
"weight_sum" the number of pairs (the step's denominator), beside the rewards' and the
correct pairs' sums. Log-probabilities are computed blockwise along the sequence (as the
language-model loss, jaxlm.train.lm), so B x L x V logits never exist at once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.model import context
from jaxlm.train import lm


def reply_logprobs(graphdef: Any, params: Any, batch: dict, side: str, block: int = 0
                   ) -> jax.Array:
    """log pi(reply) of each row of `side` ("chosen" or "rejected"): the summed
    log-probabilities of its weighted targets (B,)."""
    model = nnx.merge(graphdef, params)
    x_BxLxD = model.hidden_states(batch[f"{side}_inputs"], batch[f"{side}_positions"],
                                  batch[f"{side}_segment_ids"])

    def one(x_BxCxD, targets_BxC, weights_BxC):
        logp_BxC, _ = lm.target_logprobs(model.head_logits(x_BxCxD).astype(jnp.float32),
                                         targets_BxC)
        return {"logp": jnp.sum(logp_BxC * weights_BxC, axis=1)}

    shards = context.shards()
    size = lm.loss_block(x_BxLxD.shape[1], model.cfg.vocab_size, block, shards)
    return lm.blockwise_sums(one, (x_BxLxD, batch[f"{side}_targets"],
                                   batch[f"{side}_weights"].astype(jnp.float32)),
                             size, shards)["logp"]


def dpo_sums(policy_w_B: jax.Array, policy_l_B: jax.Array, reference_w_B: jax.Array,
             reference_l_B: jax.Array, pair_weights_B: jax.Array, beta: float
             ) -> tuple[jax.Array, dict]:
    reward_w_B = beta * (policy_w_B - reference_w_B)
    reward_l_B = beta * (policy_l_B - reference_l_B)
    z_B = reward_w_B - reward_l_B
    return _sums(jax.nn.softplus(-z_B), z_B, reward_w_B, reward_l_B, pair_weights_B)


def orpo_sums(policy_w_B: jax.Array, policy_l_B: jax.Array, tokens_w_B: jax.Array,
              tokens_l_B: jax.Array, pair_weights_B: jax.Array, beta: float
              ) -> tuple[jax.Array, dict]:
    mean_w_B = policy_w_B / jnp.maximum(tokens_w_B, 1.0)
    mean_l_B = policy_l_B / jnp.maximum(tokens_l_B, 1.0)

    def log_odds(m_B):  # m < 0: log(1 - exp(m)) = log(-expm1(m)), exact near 0
        return m_B - jnp.log(-jnp.expm1(jnp.minimum(m_B, -1e-7)))

    z_B = log_odds(mean_w_B) - log_odds(mean_l_B)
    loss_B = -mean_w_B + beta * jax.nn.softplus(-z_B)
    return _sums(loss_B, z_B, beta * mean_w_B, beta * mean_l_B, pair_weights_B)


def _sums(loss_B, z_B, reward_w_B, reward_l_B, w_B) -> tuple[jax.Array, dict]:
    ce_sum = jnp.sum(loss_B * w_B)
    return ce_sum, {"ce_sum": ce_sum, "weight_sum": jnp.sum(w_B),
                    "reward_chosen_sum": jnp.sum(reward_w_B * w_B),
                    "reward_rejected_sum": jnp.sum(reward_l_B * w_B),
                    "correct_sum": jnp.sum((z_B > 0).astype(jnp.float32) * w_B)}


def metrics(sums: dict, denom: jax.Array) -> dict:
    """Mean loss, rewards, margin and accuracy over the pairs."""
    chosen, rejected = sums["reward_chosen_sum"] / denom, sums["reward_rejected_sum"] / denom
    return {"loss": sums["ce_sum"] / denom, "reward_chosen": chosen,
            "reward_rejected": rejected, "reward_margin": chosen - rejected,
            "accuracy": sums["correct_sum"] / denom, "pairs": sums["weight_sum"]}


def figures(totals: dict[str, float], batches: int) -> dict[str, float]:
    """The evaluation's figures from sums added over batches (float64 on the host)."""
    pairs = totals["weight_sum"]
    out = {k: float(v) for k, v in metrics(totals, max(pairs, 1.0)).items()}
    return {**out, "pairs": pairs, "batches": batches}
