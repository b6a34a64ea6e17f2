"""Evaluation: a run's mean loss and perplexity on a dataset split, and log-likelihood scoring.

    jaxlm eval --workdir runs/tiny [--split validation] [--config.data.dataset=...]

`evaluate` reads the split once, in stored order, through the training pipeline
(`make_iterator(split=...)`, same packing and tokenizer) and sums the training loss code
(`train.step.loss_sums`) over every real target token: loss = total cross-entropy / tokens,
perplexity = exp(loss).

`score(model, tokenizer, context, continuation)` gives the summed log-probability of the
continuation's tokens given the context, and whether each of them is the model's argmax
(the continuation is the greedy one): what multiple-choice benchmarks need. Lists of
contexts and continuations are scored in batches. The context is encoded as a document
start ([BOS] + ids, as the pipeline does) and the continuation separately, then joined, so
write the separating space at the start of the continuation (" Paris").
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.generate import encode_prompt, fit_mesh, restore_model_params, saved_config
from jaxlm.model import transformer
from jaxlm.train import step as step_lib


class EvaluationError(ValueError):
    """Bad evaluation input (a split, a scoring request); the message names it."""


# ---- loss and perplexity on a split -------------------------------------------------------

def _zero_batch_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v) for k, v in batch.items()}


def _batches_in_step(data_iter: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The iterator's batches; with several processes, every process yields until all are
    done (a process that ran out contributes all-padding batches, weight 0)."""
    if jax.process_count() == 1:
        yield from data_iter
        return
    from jax.experimental import multihost_utils
    last = None
    while True:
        batch = next(data_iter, None)
        has = multihost_utils.process_allgather(np.asarray(batch is not None))
        if not np.any(has):
            return
        if batch is not None:
            last = batch
        yield batch if batch is not None else _zero_batch_like(last)


def eval_loss(model_cfg: ml_collections.ConfigDict, params: Any, data_iter,
              mesh: jax.sharding.Mesh, max_batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy per real target token over `data_iter`'s batches (all of them, or
    the first `max_batches`) with the training loss code; sums are added in float64."""
    from jaxlm.train.loop import to_global_batch
    abstract = nnx.eval_shape(lambda: transformer.create(model_cfg))
    graphdef, abstract_state = nnx.split(abstract)
    param_shardings = nnx.to_pure_dict(sharding.named_shardings(abstract_state, mesh))
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in step_lib.BATCH_KEYS}
    sums_fn = jax.jit(lambda p, b: step_lib.loss_sums(graphdef, p, b, 0.0)[1],
                      in_shardings=(param_shardings, batch_shardings))
    params = jax.device_put(params, param_shardings)
    pending = []  # device scalars, read once at the end (no host sync per batch)
    with jax.set_mesh(mesh), sharding.axis_rules():
        for i, batch in enumerate(_batches_in_step(data_iter)):
            if max_batches is not None and i >= max_batches:
                break
            sums = sums_fn(params, to_global_batch(batch, mesh))
            pending.append((sums["ce_sum"], sums["weight_sum"]))
    host = jax.device_get(pending)
    ce = math.fsum(float(c) for c, _ in host)
    tokens = math.fsum(float(w) for _, w in host)
    loss = ce / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"),
            "tokens": tokens, "batches": len(host)}


def evaluate(workdir: str | pathlib.Path, cfg: ml_collections.ConfigDict | None = None,
             split: str = "validation", max_batches: int | None = None) -> dict[str, Any]:
    """Loss and perplexity of the newest checkpoint of `workdir` on `split` of the config's
    dataset (the run's saved config, or `cfg`: e.g. it with overrides applied)."""
    from jaxlm.data import pipeline, sources, tokenizers
    from jaxlm.train.loop import prepare_sources
    if split not in sources.SPLITS:
        raise EvaluationError(f"split {split!r} is not one of {', '.join(sources.SPLITS)}")
    workdir = pathlib.Path(workdir)
    saved, step_dir = saved_config(workdir)
    cfg = fit_mesh(cfg if cfg is not None else saved)
    mesh = sharding.make_mesh(cfg.mesh)
    config_lib.validate(cfg, jax.device_count())
    tokenizer = tokenizers.load_saved(workdir / "tokenizer")
    prepare_sources(cfg.data)
    data_iter = pipeline.make_iterator(cfg.data, split=split, process_index=jax.process_index(),
                                       process_count=jax.process_count(), tokenizer=tokenizer)
    try:
        params = restore_model_params(cfg.model, step_dir, mesh)
        result = eval_loss(cfg.model, params, data_iter, mesh, max_batches)
    finally:
        data_iter.close()
    return {**result, "split": split, "dataset": cfg.data.dataset, "checkpoint": str(step_dir)}


# ---- log-likelihood scoring ---------------------------------------------------------------

class ScoringError(EvaluationError):
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


def score_tokens(model: transformer.Transformer, contexts: Sequence[Sequence[int]],
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


def score(model: transformer.Transformer, tokenizer, context: str | Sequence[str],
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
