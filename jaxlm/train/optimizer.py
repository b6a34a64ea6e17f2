"""AdamW with warmup + cosine or warmup-stable-decay, global-norm clipping, masked decay."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine to min_lr_ratio x peak ("cosine"), or
    constant then linear decay to min_lr_ratio x peak over the last decay_fraction ("wsd")."""
    peak = optim_cfg.learning_rate
    floor = peak * optim_cfg.min_lr_ratio
    warmup = min(optim_cfg.warmup_steps, total_steps)
    after = max(total_steps - warmup, 1)
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if optim_cfg.schedule == "cosine":
        main_fn = optax.cosine_decay_schedule(peak, after, alpha=optim_cfg.min_lr_ratio)
    else:
        decay = max(int(round(after * optim_cfg.decay_fraction)), 1)
        main_fn = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
            [after - decay])
    if warmup == 0:
        return main_fn
    return optax.join_schedules([warmup_fn, main_fn], [warmup])


def decay_mask(params: Any) -> Any:
    """True for weight matrices (names starting with "w", and lm_head); False for embeddings,
    position tables, norm scales and biases, which weight decay would only pull to zero."""
    def is_matrix(path, _):
        name = path[-1].key
        return name.startswith("w") or name == "lm_head"
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
