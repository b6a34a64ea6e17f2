"""The model FLOPs `jaxlm bench step` divides by for the encoder (bert) and encoder-decoder
(t5) families (the pretraining task's flops_per_token times B x data.seq_len) equal an
independent count: every dot_general in the jaxpr of the task's loss and its gradient,
unscanned and without remat (so each matmul the step needs is there once), at 2 x output
elements x contracted size.
"""

from __future__ import annotations

import math

import jax
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.model import counts, zoo
from jaxlm.train import lm, pretraining, seq2seq

# Tiny and odd: head size x heads != d_model for t5, more decoder than encoder layers.
TINY_BERT = ["--config.model.d_model=24", "--config.model.n_heads=3",
             "--config.model.n_kv_heads=3", "--config.model.d_ff=40", "--config.model.n_layers=2",
             "--config.model.vocab_size=301", "--config.data.seq_len=12",
             "--config.model.max_seq_len=14", "--config.data.global_batch_size=8"]
TINY_T5 = ["--config.model.d_model=24", "--config.model.n_heads=3", "--config.model.n_kv_heads=3",
           "--config.model.head_dim=10", "--config.model.d_ff=40", "--config.model.n_layers=1",
           "--config.model.n_decoder_layers=2", "--config.model.vocab_size=301",
           "--config.data.seq_len=32", "--config.model.max_seq_len=32",
           "--config.data.global_batch_size=8"]
UNROLLED = ["--config.model.remat=none", "--config.model.scan_layers=false"]


# ---- an independent count of the matmuls -----------------------------------------------------

def _subjaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def matmul_flops(jaxpr) -> int:
    """2 x output elements x contracted size, summed over every dot_general of the jaxpr and
    of the jaxprs inside its equations (a scan's body times its length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[d] for d in lhs_contract)
            continue
        inner = sum(matmul_flops(sub) for sub in _subjaxprs(eqn.params))
        if inner and eqn.primitive.name in ("while", "cond"):
            raise AssertionError(f"matmuls inside {eqn.primitive.name}: no fixed count")
        total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def step_matmul_flops(task, loss_sums) -> int:
    """The matmul FLOPs of the task's loss and its gradient for every parameter, on a batch
    of the task's layout."""
    graphdef, params = nnx.split(zoo.create(task.cfg.model))
    params = nnx.to_pure_dict(params)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype)
             for k, (shape, dtype, _) in task.batch_layout().items()}

    def objective(p, b):
        return loss_sums(graphdef, p, b, 0.0)[0]

    return matmul_flops(jax.make_jaxpr(jax.value_and_grad(objective))(params, batch).jaxpr)


def _task(config: str, overrides: list[str]):
    return pretraining.task(config_lib.load(f"configs/{config}", overrides + UNROLLED))


def test_bert_model_flops_equal_the_matmuls_of_its_step():
    task = _task("bench_cpu_bert.py", TINY_BERT)
    cfg = task.cfg
    assert task.name == "masked_lm" and cfg.model.family == "bert"
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    # Every matmul is useful: bidirectional attention over the whole row, the masked-LM head
    # (its D x D transform and the tied D x V output) at every position.
    assert task.flops_per_token() * tokens == step_matmul_flops(task, lm.loss_sums)


@pytest.mark.parametrize("gated", [True, False])
def test_t5_model_flops_equal_the_matmuls_of_its_step_less_the_masked_causal_half(gated):
    task = _task("bench_cpu_t5.py", TINY_T5 + [f"--config.model.gated_mlp={gated}",
                                                "--config.model.activation=relu"])
    cfg, m = task.cfg, task.cfg.model
    assert task.name == "span_corruption" and (m.n_layers, m.n_decoder_layers) == (1, 2)
    b, s = cfg.data.global_batch_size, cfg.data.seq_len
    t = seq2seq.targets_len(cfg)
    # The decoder's self-attention computes all T x T scores and masks the upper half; the
    # model FLOPs count the useful (causal) half: 6 of the 12 B T^2 H K per layer.
    masked_half = 6 * m.n_decoder_layers * b * t * t * m.n_heads * counts.head_dim(m)
    assert task.flops_per_token() * b * s + masked_half == step_matmul_flops(
        task, seq2seq.loss_sums)
