"""Quantized training (QAT) through Qwix.

Qwix intercepts `jax.lax.dot_general` (the call every projection makes,
jaxlm.model.layers.dense) while a model method runs, and quantizes the operands of the
calls whose module path matches a rule: per-channel absmax scales, an integer (or fp8)
matmul, the result rescaled; gradients pass straight through the rounding (and are
themselves quantized when `quant.backward` is set). Model code does not change.

Quantized here: the matmuls of `hidden_states` (attention and MLP projections of every
block, under the layer scan and remat as they run). Not quantized: the LM head (the loss
reads `head_logits`, another method), the attention scores and values (einsums, not
matched), the embedding lookup. The parameters, their gradients, the optimizer state and
checkpoints stay float32: the quantization happens on the fly inside each step.

The quantized model is a graphdef: `nnx.merge(training_graphdef(...), params)` with the
float parameters gives a model whose `hidden_states` runs quantized, wherever the step,
the evaluation or a compile merges it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx

QTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
# Gradients in fp8 keep range rather than precision (e5m2), as fp8 training recipes do.
BACKWARD_QTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e5m2}
METHOD = "hidden_states"  # the model method whose matmuls are quantized


def rules(quant_cfg: ml_collections.ConfigDict) -> list[qwix.QtRule]:
    """The Qwix rules of config `quant`: weights and activations of quant.training's type,
    gradients of quant.backward's, in the modules quant.layers matches."""
    qtype = QTYPES[quant_cfg.training]
    backward = BACKWARD_QTYPES.get(quant_cfg.backward)
    return [qwix.QtRule(module_path=quant_cfg.layers, op_names=("dot_general",),
                        weight_qtype=qtype, act_qtype=qtype, bwd_qtype=backward)]


def training_graphdef(model: nnx.Module, quant_cfg: ml_collections.ConfigDict) -> Any:
    """The graphdef of `model` (abstract or concrete) with its hidden-state matmuls
    quantized by config `quant`; its state is the float model's."""
    # The projections call lax.dot_general directly (jaxlm.model.layers.dense): no jitted
    # jax.numpy wrapper caches a quantized trace (Qwix's disable_jit would avoid that too,
    # but it also turns the layer scan into a Python loop: every layer traced apart).
    provider = qwix.QtProvider(rules(quant_cfg))
    # Qwix runs the model once to create calibration state; quantized training with
    # dynamic (per-batch) scales has none, so the tokens are only a placeholder.
    quantized = qwix.quantize_model(model, provider, jnp.zeros((1, 1), jnp.int32),
                                    methods=(METHOD,), skip_nnx_init=True)
    graphdef, state = nnx.split(quantized)
    # The float parameters merge into it: Qwix added no state.
    assert jax.tree.structure(state) == jax.tree.structure(nnx.split(model)[1])
    return graphdef
