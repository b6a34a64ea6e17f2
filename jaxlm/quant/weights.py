"""A float checkpoint's parameters, restored and quantized where they are placed.

QLoRA's frozen base (jaxlm.finetune) and `jaxlm quantize` (jaxlm.infer) both start from a
float run: its parameters are restored sharded on the mesh and quantized under jit into
the layout of the quantized model of the same config (jaxlm/model/quantized.py), shard by
shard. The same parameters always give the same codes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.model import quantized, zoo
from jaxlm.parallel import rules


def float_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model_cfg` with float weights: the model a quantized one was made from."""
    out = ml_collections.ConfigDict(model_cfg.to_dict())
    out.weights, out.weight_group = "float", 0
    return out


def quantize_placed(float_params: Any, model_cfg: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> Any:
    """The float parameters of `model_cfg`'s model quantized as model_cfg.weights and
    weight_group say, placed on `mesh` as the quantized model's rules place them."""
    graphdef, _ = nnx.split(zoo.abstract(float_config(model_cfg)))
    _, abstract_q = nnx.split(zoo.abstract(model_cfg))
    fmt, group = model_cfg.weights, model_cfg.weight_group
    return jax.jit(lambda p: quantized.quantize_params(graphdef, p, fmt, group),
                   out_shardings=rules.shardings_of(abstract_q, mesh))(float_params)


def restore_quantized(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> Any:
    """The float parameters of checkpoint `path` (a run, or one step), quantized as
    `model_cfg` says, on `mesh`."""
    _, state = nnx.split(zoo.abstract(float_config(model_cfg)))
    params = checkpoint_lib.restore_params(path, rules.abstract_of(state, mesh))
    return quantize_placed(params, model_cfg, mesh)


def restore_params(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict,
                   abstract: Any, mesh: jax.sharding.Mesh) -> Any:
    """The parameters of checkpoint `path` for `model_cfg`'s model: read into `abstract`
    as saved, or (quantized weights: a float base of QLoRA) restored float and quantized."""
    if model_cfg.weights == "float":
        return checkpoint_lib.restore_params(path, abstract)
    return restore_quantized(path, model_cfg, mesh)
