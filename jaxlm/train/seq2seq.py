"""Span corruption: the pretraining task of an encoder-decoder (objective.name
"span_corruption", family t5), as T5 pretrains.

The pipeline (jaxlm.data.pipeline) corrupts each document's noise spans into sentinels and
packs the encoder inputs (data.seq_len) and the decoder targets (objective.targets_len, or
T5's derived length) into separate rows with their own segment ids and positions. The
model reads the encoder row and, teacher-forced, the decoder inputs (targets shifted right
per example); the loss is the cross-entropy of the real target tokens, as in causal LM
(jaxlm.train.lm.cross_entropy_sums). Everything else (state, init_from, evaluation, data
state) is causal LM's.

FLOPs are counted per encoder token (the loop's tokens per step are the encoder's):
jaxlm.model.counts.encoder_decoder_flops_per_step over B x data.seq_len.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.data import objectives
from jaxlm.model import counts
from jaxlm.train.lm import CausalLM, cross_entropy_sums, token_metrics
from jaxlm.train.step import Objective
from jaxlm.train.task import BatchLayout


def targets_len(cfg) -> int:
    """The decoder row's length: objective.targets_len, or the one T5's formula derives for
    data.seq_len inputs at this noise density and span length."""
    return objectives.check_span_corruption(cfg.objective, cfg.data.seq_len)[1]


def logits(graphdef: Any, params: Any, batch: dict) -> jax.Array:
    """The decoder's logits (B x T x V) of a row pair, teacher-forced."""
    model = nnx.merge(graphdef, params)
    return model(batch["inputs"], batch["decoder_inputs"],
                 input_positions=batch["input_positions"],
                 input_segment_ids=batch["input_segment_ids"],
                 decoder_positions=batch["positions"], decoder_segment_ids=batch["segment_ids"])


def loss_sums(graphdef: Any, params: Any, batch: dict, z_loss: float):
    return cross_entropy_sums(logits(graphdef, params, batch), batch, z_loss)


class SpanCorruption(CausalLM):
    name = "span_corruption"

    def batch_layout(self) -> BatchLayout:
        b, s, t = self.cfg.data.global_batch_size, self.cfg.data.seq_len, targets_len(self.cfg)
        axes = ("batch", "sequence")
        encoder = ((b, s), jnp.int32, axes)
        decoder = ((b, t), jnp.int32, axes)
        return {"inputs": encoder, "input_segment_ids": encoder, "input_positions": encoder,
                "decoder_inputs": decoder, "targets": decoder, "segment_ids": decoder,
                "positions": decoder, "weights": ((b, t), jnp.float32, axes)}

    def objective(self) -> Objective:
        graphdef, z_loss = self.graphdef, self.cfg.optim.z_loss

        def sums(trainable, frozen, batch, key, train):
            return loss_sums(graphdef, trainable["params"], batch, z_loss if train else 0.0)

        return Objective(sums, token_metrics)

    def flops_per_token(self) -> float:
        s = self.cfg.data.seq_len
        return counts.encoder_decoder_flops_per_step(self.cfg.model, s, targets_len(self.cfg)) / s

