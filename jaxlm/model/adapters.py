"""LoRA adapters folded into the weights they adapt: W + scale A^T B, on the host.

A LoRA run saves its adapters as a nested dict mirroring the model's parameters: beside
weight `W` of a module sits `lora_W` holding `lora_a` (layers, r, *in) and `lora_b`
(layers, r, *out) (jaxlm.finetune.lora attaches them). `merge` gives the parameters of the
plain model that computes what base + adapters compute. `jaxlm lora merge` (writing a new
run) and generation from an unmerged LoRA run (in memory, jaxlm.infer.run_params) both
use it, so the two give bit-identical weights.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

PREFIX = "lora_"


def adapter_pairs(adapters: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple, dict]]:
    """(path of `lora_W`, {"lora_a", "lora_b"}) of every adapter in the nested dict."""
    for k, v in adapters.items():
        if isinstance(v, dict) and "lora_a" in v:
            yield path + (k,), v
        elif isinstance(v, dict):
            yield from adapter_pairs(v, path + (k,))


def merge(base: Any, adapters: Any, scale: float) -> Any:
    """Base parameters with every adapter folded in: W + scale A^T B (scale = alpha / r),
    computed in float64 and stored as W's dtype. Returns a new nested dict of numpy arrays;
    parameters without an adapter are copied bit for bit."""
    merged = jax.tree.map(np.asarray, base)
    for path, pair in adapter_pairs(adapters):
        *parents, adapter_name = path
        node = merged
        for p in parents:
            node = node[p]
        name = adapter_name[len(PREFIX):]
        w = node[name]
        a_LxRxI = np.asarray(pair["lora_a"], np.float64)
        b_LxRxO = np.asarray(pair["lora_b"], np.float64)
        layers, rank = a_LxRxI.shape[:2]
        delta_LxIxO = np.einsum("lri,lro->lio", a_LxRxI.reshape(layers, rank, -1),
                                b_LxRxO.reshape(layers, rank, -1))
        node[name] = (w.astype(np.float64) + scale * delta_LxIxO.reshape(w.shape)).astype(w.dtype)
    return merged
