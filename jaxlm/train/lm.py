"""Token-level pretraining, the tasks of `jaxlm train`: causal language modelling
(decoder families) and masked language modelling (encoder families, objective.name
"masked_lm"). Span corruption (encoder-decoder) builds on this in jaxlm.train.seq2seq.

Loss is cross-entropy averaged over the weighted target tokens (causal LM: every real next
token, never padding; masked LM: the selected positions, predicting the original token),
plus an optional z-loss (coefficient optim.z_loss on log(Z)^2). It is computed blockwise
along the sequence (optim.loss_block): the head's float32 logits of one block of positions
exist at a time, forward and backward (each block is recomputed in the backward pass), so
a 128k vocabulary never materialises B x L x V logits. Both call the model as
model(inputs, positions, segment_ids); only the data differs, and the pipeline
(jaxlm.data.pipeline) makes it from the objective section. The state is the model's
parameters, from scratch or from `checkpoint.init_from`. Evaluation reads a split once, in
stored order, and reports the loss per target token and its perplexity.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.data import pipeline, sources, tokenizers
from jaxlm.errors import ConfigError, UserError
from jaxlm.model import context, zoo
from jaxlm.parallel import distributed, rules
from jaxlm.quant import training as quant_training
from jaxlm.train import state as state_lib
from jaxlm.train.step import Objective
from jaxlm.train.task import (
    Batches,
    BatchLayout,
    Say,
    Task,
    token_batch_layout,
    token_figures,
)
from jaxlm.train.validate import validate

LOGITS_PER_BLOCK_ROW = 1 << 24  # automatic loss_block: 64 MiB of float32 logits per row


def loss_block(length: int, vocab: int, configured: int = 0, shards: int = 1) -> int:
    """Positions per block of the blockwise cross-entropy (of each of the `shards` context
    shards of a row): `configured` if set; else the whole shard while its logits fit
    LOGITS_PER_BLOCK_ROW, else the largest divisor of the shard's length that does (one
    position at the least)."""
    if configured:
        return configured
    fits = max(LOGITS_PER_BLOCK_ROW // vocab, 1)
    part = length // shards
    return max(c for c in range(1, min(part, fits) + 1) if part % c == 0)


def loss_sums(graphdef: Any, params: Any, batch: dict, z_loss: float, block: int = 0,
              routing: tuple[float, float] = (0.0, 0.0)) -> tuple[jax.Array, dict]:
    """Summed (not averaged) objective over the batch's weighted tokens, and its parts;
    `block`: optim.loss_block. A mixture-of-experts model adds its routers' losses with the
    coefficients `routing` (optim.moe_aux_loss, optim.moe_z_loss): `with_routing`."""
    model = nnx.merge(graphdef, params)
    x_BxLxD, figures = hidden_and_routing(model, batch)
    shards = context.shards()
    size = loss_block(x_BxLxD.shape[1], model.cfg.vocab_size, block, shards)
    total, sums = blockwise_cross_entropy_sums(x_BxLxD, model.head_logits, batch, z_loss, size,
                                               shards)
    return with_routing(total, sums, figures, *routing)


def hidden_and_routing(model: Any, batch: dict) -> tuple[jax.Array, Any]:
    """A decoder's hidden states of the batch's inputs and, for a mixture of experts, every
    layer's routing figures (None for other models)."""
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if model.cfg.n_experts:
        return model.routed_hidden_states(*inputs)
    return model.hidden_states(*inputs), None


def with_routing(total: jax.Array, sums: dict, figures, aux_weight: float, z_weight: float
                 ) -> tuple[jax.Array, dict]:
    """The routers' load-balancing and z-losses (jaxlm.model.moe.RoutingFigures, averaged
    over the layers) added to a summed objective, weighted by the batch's target tokens: the
    step's division by them leaves coefficient x loss (and a weighted mean over accumulated
    microbatches). The figures join the sums the same way, for the metrics. A model without
    experts (figures None): the objective as it is."""
    if figures is None:
        return total, sums
    n = sums["weight_sum"]
    aux, z = jnp.mean(figures.aux_loss), jnp.mean(figures.z_loss)
    routed = {"moe_aux_sum": aux * n, "moe_z_sum": z * n,
              "moe_dropped_sum": jnp.mean(figures.dropped) * n,
              "moe_load_sum": jnp.mean(figures.load_E, axis=0) * n}
    return total + (aux_weight * aux + z_weight * z) * n, {**sums, **routed}


def blockwise_cross_entropy_sums(x_BxLxD: jax.Array, head_logits, batch: dict, z_loss: float,
                                 block: int, shards: int = 1) -> tuple[jax.Array, dict]:
    """cross_entropy_sums of head_logits(x) computed `block` positions at a time
    (blockwise_sums)."""
    def one(x_BxCxD, targets_BxC, weights_BxC):
        return cross_entropy_sums(head_logits(x_BxCxD),
                                  {"targets": targets_BxC, "weights": weights_BxC}, z_loss)[1]

    sums = blockwise_sums(one, (x_BxLxD, batch["targets"], batch["weights"]), block, shards)
    return sums["ce_sum"] + z_loss * sums["z_sum"], sums


def blockwise_sums(fn, arrays: tuple[jax.Array, ...], block: int, shards: int = 1
                   ) -> dict[str, jax.Array]:
    """fn(*arrays) (a dict of sums over positions; each array B x L x ...) computed `block`
    positions at a time and added up: a scan over the blocks, each under jax.checkpoint, so
    one block's logits (B x block x V) live at a time in the forward pass and again in the
    backward pass. Under context parallelism (rows split into `shards` along the context
    axis) each scan step takes block k of every shard, so every device works on its own
    positions."""
    if block * shards >= arrays[0].shape[1]:
        return fn(*arrays)
    one = jax.checkpoint(fn)

    def add(total, xs):
        return jax.tree.map(jnp.add, total, one(*xs)), None

    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(fn, *(a[:, :shards * block] for a in arrays)))
    sums, _ = jax.lax.scan(add, zero, _blocks(arrays, block, shards))
    return sums


def blockwise_map(fn, arrays: tuple[jax.Array, ...], block: int, shards: int = 1) -> Any:
    """fn(*arrays) (position-wise: each output B x L x ...) computed `block` positions at a
    time (blockwise_sums' blocks, forward only), the outputs put back in order."""
    b, length = arrays[0].shape[:2]
    if block * shards >= length:
        return fn(*arrays)
    n = length // (shards * block)

    def unblock(a):  # n x B x (shards * block) x ... -> B x L x ...
        rest = a.shape[3:]
        a = jnp.moveaxis(a.reshape(n, b, shards, block, *rest), 0, 2)
        return a.reshape(b, length, *rest)

    return jax.tree.map(unblock, jax.lax.map(lambda xs: fn(*xs),
                                             _blocks(arrays, block, shards)))


def _blocks(arrays: tuple[jax.Array, ...], block: int, shards: int) -> tuple[jax.Array, ...]:
    """Each B x L x ... array as n x B x (shards * block) x ...: block k of every shard."""
    b, length = arrays[0].shape[:2]
    n = length // (shards * block)

    def blocks(a_BxL):
        rest = a_BxL.shape[2:]
        a = jnp.moveaxis(a_BxL.reshape(b, shards, n, block, *rest), 2, 0)
        return a.reshape(n, b, shards * block, *rest)

    return tuple(blocks(a) for a in arrays)


def target_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """(log p(target) at each position, log Z) of the logits."""
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return target_logit_BxL - log_z_BxL, log_z_BxL


def cross_entropy_sums(logits_BxLxV: jax.Array, batch: dict, z_loss: float
                       ) -> tuple[jax.Array, dict]:
    """Summed cross-entropy of logits against batch["targets"], weighted by batch["weights"]
    (+ z_loss * log(Z)^2), and its parts."""
    logp_BxL, log_z_BxL = target_logprobs(logits_BxLxV, batch["targets"])
    weights_BxL = batch["weights"].astype(jnp.float32)
    ce_sum = jnp.sum(-logp_BxL * weights_BxL)
    z_sum = jnp.sum(jnp.square(log_z_BxL) * weights_BxL)
    objective = ce_sum + z_loss * z_sum
    return objective, {"ce_sum": ce_sum, "z_sum": z_sum, "weight_sum": jnp.sum(weights_BxL)}


def token_metrics(sums: dict, denom: jax.Array) -> dict:
    """What a token-level objective reports: loss per target token, log(Z)^2, targets."""
    out = {"loss": sums["ce_sum"] / denom, "log_z_squared": sums["z_sum"] / denom,
           "target_tokens": sums["weight_sum"]}
    if "moe_aux_sum" in sums:  # a mixture of experts: its routing health
        load_E = sums["moe_load_sum"] / denom
        out.update(moe_aux_loss=sums["moe_aux_sum"] / denom, moe_z_loss=sums["moe_z_sum"] / denom,
                   moe_dropped=sums["moe_dropped_sum"] / denom, moe_load_max=jnp.max(load_E),
                   **{f"moe_load_{e}": load_E[e] for e in range(load_E.shape[0])})
    return out


def model_state_spec(model_cfg: ml_collections.ConfigDict, tx, mesh, seed: int,
                     quant_cfg: ml_collections.ConfigDict | None = None,
                     frozen: dict[str, Any] | None = None) -> tuple[Any, state_lib.StateSpec]:
    """(graphdef, the state layout) of a task that trains every parameter of the model;
    with `quant_cfg` (config `quant`) quantizing its matmuls, the graphdef runs them
    quantized (jaxlm.quant.training) on the same float state. `frozen`: the abstract
    inputs the step reads beside the state (a distillation teacher)."""
    model = zoo.abstract(model_cfg, seed)
    graphdef, params = nnx.split(model)
    if quant_cfg is not None and quant_cfg.training != "none":
        graphdef = quant_training.training_graphdef(model, quant_cfg)
    spec = state_lib.make_spec({"params": rules.abstract_of(params, mesh)},
                               {"params": rules.axes_of(params)}, tx, mesh, frozen)
    return graphdef, spec


class CausalLM(Task):
    """Causal or masked LM, as objective.name says (the family must fit it:
    jaxlm.train.validate)."""

    name = "causal_lm"

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
                 *, tokenizer: tokenizers.Tokenizer | None = None, num_devices: int | None = None):
        """`tokenizer`: the one a run saved (evaluating it); default: data.tokenizer's.
        `workdir` is not read: a pretraining run's config says everything.
        `num_devices`: the devices the config is checked for (default: JAX's)."""
        num_devices = num_devices or jax.device_count()
        validate(cfg, num_devices)
        if cfg.finetune.task:
            raise ConfigError(f"config.finetune.task={cfg.finetune.task!r}: this is a "
                              f"fine-tuning config; run `jaxlm finetune`")
        self._tokenizer = tokenizer
        if tokenizer is None and not cfg.model.vocab_size:  # the vocabulary comes from it
            self._tokenizer = tokenizers.load_tokenizer(cfg.data)
        vocab = self._tokenizer.vocab_size if self._tokenizer is not None else 0
        self.cfg = config_lib.resolved(cfg, vocab, num_devices)
        self.name = self.cfg.objective.name
        self.frozen = {}
        self._eval_batches: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """data.tokenizer's, read when first needed (compiling for a topology never does),
        and checked to fit model.vocab_size."""
        if self._tokenizer is None:
            tokenizer = tokenizers.load_tokenizer(self.cfg.data)
            config_lib.resolve_vocab(self.cfg.model, self.cfg.data, tokenizer.vocab_size)
            self._tokenizer = tokenizer
        return self._tokenizer

    # ---- data ------------------------------------------------------------------------------

    def batch_layout(self) -> BatchLayout:
        return token_batch_layout(self.cfg.data.global_batch_size, self.cfg.data.seq_len)

    def train_batches(self, rows: list[int], say: Say) -> Batches:
        for name, stats in sources.prepare_all(self.cfg.data).items():
            say(f"source {name}: {stats['train_documents']:,} train / "
                f"{stats['validation_documents']:,} validation documents; "
                f"{stats['empty_skipped']:,} empty skipped; "
                f"{stats['invalid_utf8_replaced']:,} with invalid UTF-8 replaced"
                + (f"; {stats['long_documents_split']:,} longer than data.max_document_bytes "
                   f"split" if stats.get("long_documents_split") else ""))
        return self.batches("train", rows=rows)

    def batches(self, split: str, **where) -> pipeline.BatchIterator:
        """The pipeline's batches of `split` for this objective (`where`: make_iterator's
        rows or process_index/process_count)."""
        return pipeline.make_iterator(self.cfg.data, split=split, tokenizer=self.tokenizer,
                                      objective_cfg=self.cfg.objective,
                                      model_vocab_size=self.cfg.model.vocab_size, **where)

    # ---- state and objective ---------------------------------------------------------------

    def state_spec(self, tx, mesh) -> state_lib.StateSpec:
        self.graphdef, spec = model_state_spec(self.cfg.model, tx, mesh, self.cfg.train.seed,
                                               self.cfg.quant)
        return spec

    def objective(self) -> Objective:
        graphdef, optim = self.graphdef, self.cfg.optim

        def sums(trainable, frozen, batch, key, train):
            return loss_sums(graphdef, trainable["params"], batch,
                             optim.z_loss if train else 0.0, optim.loss_block,
                             (optim.moe_aux_loss, optim.moe_z_loss))

        return Objective(sums, token_metrics)

    def init_state(self) -> state_lib.TrainState:
        """Fresh parameters drawn from train.seed, or those of checkpoint.init_from."""
        self.frozen = {}
        model_cfg, seed = self.cfg.model, self.cfg.train.seed

        def params():
            return {"params": nnx.to_pure_dict(nnx.state(zoo.create(model_cfg, seed)))}

        state = state_lib.init_state(self.spec, self.tx, params)
        if self.cfg.checkpoint.init_from:
            state["params"] = checkpoint_lib.restore_params(self.cfg.checkpoint.init_from,
                                                            self.spec.abstract["params"])
        return state

    def metadata(self) -> dict[str, Any]:
        return checkpoint_lib.run_metadata(self.cfg, self.spec.axes["params"], self.tokenizer.name)

    def describe(self) -> str:
        return (f"model: {self.cfg.model.family}, {zoo.param_count(self.cfg.model):,} "
                f"parameters" + ("" if self.name == "causal_lm" else f"; objective {self.name}"))

    def flops_per_token(self) -> float:
        return zoo.flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, state, split: str = "validation", max_batches: int | None = None
                 ) -> dict[str, float]:
        """Loss and perplexity over `split` of the dataset, read once in stored order
        through the training pipeline (same packing and tokenizer). The first `max_batches`
        are read once and kept (evaluation during training reuses them)."""
        if split not in sources.SPLITS:
            raise UserError(f"split {split!r} is not one of {', '.join(sources.SPLITS)}")
        kept = self._eval_batches.get((split, max_batches))
        if kept is not None:
            return token_figures(*self.sum_batches(state, iter(kept)))
        sources.prepare_all(self.cfg.data)
        data_iter = self.batches(split, rows=distributed.local_rows(
            rules.batch_sharding(self.mesh), self.cfg.data.global_batch_size))
        try:
            if max_batches is None:
                return token_figures(*self.sum_batches(state, data_iter))
            kept = list(itertools.islice(data_iter, max_batches))
        finally:
            data_iter.close()
        self._eval_batches[(split, max_batches)] = kept
        return token_figures(*self.sum_batches(state, iter(kept)))

    def eval_label(self, split: str) -> str:
        return f"{self.cfg.data.dataset} {split}"

