"""Family moe: the LLaMA network with a mixture of SwiGLU experts in place of each block's
MLP (Mixtral, Qwen-MoE shapes): `LlamaMoE`, its layer `MoE`.

A router (a D x E matrix, float32 logits) scores every token against the E experts; the
token goes to its top k experts (model.experts_per_token) with their softmax probabilities
as weights, renormalised over the k when model.router_norm_topk (Mixtral, Qwen3-MoE; Qwen2-
MoE does not). Optional shared experts (model.d_shared: one SwiGLU of that width, as
Qwen-MoE and DeepSeek have; model.shared_gate: scaled by sigmoid(x w), as Qwen2-MoE) see
every token. How tokens reach their experts (model.moe_dispatch):

    dropless  every assignment computed: the T x k assignments sorted by expert and run as
              grouped matmuls (jax.lax.ragged_dot on TPU and GPU; on CPU `moe_cpu`'s
              batched matmuls for a balanced share and blocks for the rest), then
              scattered back, weighted. The default; no token is ever dropped.
    capacity  each expert takes at most C = ceil(capacity_factor * T * k / E) assignments,
              in token order, a token's first choice before its second (position t * k + j
              of the flattened T x k assignments); the rest are dropped: their expert output
              is lost and the residual carries the token. Fixed E x C x D buffers (batched
              matmuls), the layout expert parallelism exchanges.
    dense     every expert on every token, masked by the routing weights: the reference the
              tests and the benchmark compare against (E / k times the work).

Per layer the module records its routing figures (`RoutingFigures`): the load-balancing
loss E * sum_e f_e P_e (f_e: the fraction of tokens whose top k include e; P_e: the mean
router probability of e; Switch Transformer's, as Hugging Face's Mixtral computes it: k at
perfect balance), the router z-loss mean(logsumexp(logits)^2) (ST-MoE), each expert's load
(its share of the assignments, summing to 1) and the dropped fraction. T counts every
position of the batch, padding included.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxlm.model import moe_cpu
from jaxlm.model.layers import SwiGLU, param, project
from jaxlm.model.llama import Llama
from jaxlm.parallel import rules


class RoutingFigures(NamedTuple):
    """One layer's routing health (scalars; `load_E` one share per expert)."""

    aux_loss: jax.Array
    z_loss: jax.Array
    load_E: jax.Array
    dropped: jax.Array


def capacity(tokens: int, k: int, experts: int, factor: float) -> int:
    """Assignments each expert takes under capacity dispatch."""
    return max(1, math.ceil(factor * tokens * k / experts))


def route(logits_TxE: jax.Array, k: int, norm_topk: bool) -> tuple[jax.Array, jax.Array]:
    """(weights T x k, expert ids T x k) of the top k experts, best first."""
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    weights_TxK, experts_TxK = jax.lax.top_k(probs_TxE, k)
    if norm_topk:
        weights_TxK = weights_TxK / jnp.sum(weights_TxK, axis=-1, keepdims=True)
    return weights_TxK, experts_TxK


def routing_figures(logits_TxE: jax.Array, experts_TxK: jax.Array, dropped: jax.Array
                    ) -> RoutingFigures:
    tokens, n_experts = logits_TxE.shape
    counts_E = jnp.zeros(n_experts, jnp.float32).at[experts_TxK.reshape(-1)].add(1.0)
    probs_E = jnp.mean(jax.nn.softmax(logits_TxE, axis=-1), axis=0)
    aux = n_experts * jnp.sum(counts_E / tokens * probs_E)
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)))
    return RoutingFigures(aux, z, counts_E / experts_TxK.size, dropped)


class MoE(nnx.Module):
    """E SwiGLU experts of width d_expert behind a top-k router (and the shared experts)."""

    def __init__(self, cfg: ml_collections.ConfigDict, std: float, out_std: float, dtype,
                 rngs: nnx.Rngs):
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_expert or cfg.d_ff
        self.router = param(rngs, (d, e), ("embed", "experts_router"), std)
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), out_std)
        self.shared = SwiGLU(d, cfg.d_shared, std, out_std, dtype, rngs) if cfg.d_shared \
            else None
        self.shared_gate = param(rngs, (d, 1), ("embed", None), std) if cfg.shared_gate \
            else None
        self.k, self.norm_topk = cfg.experts_per_token, cfg.router_norm_topk
        self.dispatch, self.capacity_factor = cfg.moe_dispatch, cfg.capacity_factor
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.apply(x_BxLxD)[0]

    def apply(self, x_BxLxD: jax.Array) -> tuple[jax.Array, RoutingFigures]:
        """The layer's output (B x L x D) and its routing figures."""
        b, length, d = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(b * length, d)
        logits_TxE = project(self, "router", x_BxLxD, jnp.float32).reshape(b * length, -1)
        weights_TxK, experts_TxK = route(logits_TxE, self.k, self.norm_topk)
        weights_TxK = weights_TxK.astype(self.dtype)
        experts = (self.w_gate[...].astype(self.dtype), self.w_up[...].astype(self.dtype),
                   self.w_down[...].astype(self.dtype))
        dropped = jnp.zeros((), jnp.float32)
        if self.dispatch == "dropless" and rules.logical_size("expert") > 1:
            y_BxLxD = over_expert_axis(x_BxLxD.astype(self.dtype),
                                       weights_TxK.reshape(b, length, -1),
                                       experts_TxK.reshape(b, length, -1), *experts)
        else:
            if self.dispatch == "dropless":
                y_TxD = dropless(x_TxD.astype(self.dtype), weights_TxK, experts_TxK, *experts)
            elif self.dispatch == "capacity":
                y_TxD, dropped = by_capacity(x_TxD.astype(self.dtype), weights_TxK,
                                             experts_TxK, *experts, self.capacity_factor)
            else:
                y_TxD = dense(x_TxD.astype(self.dtype), weights_TxK, experts_TxK, *experts)
            y_BxLxD = y_TxD.reshape(b, length, d)
        if self.shared is not None:
            shared_BxLxD = self.shared(x_BxLxD)
            if self.shared_gate is not None:
                gate_BxLx1 = project(self, "shared_gate", x_BxLxD, jnp.float32)
                shared_BxLxD = shared_BxLxD * jax.nn.sigmoid(gate_BxLx1).astype(self.dtype)
            y_BxLxD = y_BxLxD + shared_BxLxD
        y_BxLxD = rules.constrain(y_BxLxD, ("batch", "act_sequence", "act_embed"))
        return y_BxLxD, routing_figures(logits_TxE, experts_TxK, dropped)


def _swiglu(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def dropless(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
             grouped: str = "auto"):
    """Every assignment, sorted by expert, through grouped matmuls (`mixture`)."""
    token_A, expert_A, weight_A = _by_expert(weights_TxK, experts_TxK)
    sizes_E = jnp.zeros(w_gate_ExDxF.shape[0], jnp.int32).at[expert_A].add(1)
    return mixture(x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                   -(-token_A.shape[0] // w_gate_ExDxF.shape[0]), grouped)


def _by_expert(weights_TxK, experts_TxK):
    """The T x k assignments sorted by expert (stably: token order within an expert): each
    one's token, expert and weight."""
    k = experts_TxK.shape[-1]
    expert_A = experts_TxK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    return order_A // k, expert_A[order_A], weights_TxK.reshape(-1)[order_A]


def mixture(x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
            balanced: int, grouped: str = "auto"):
    """out[t]: the sum over the assignments a of token t of weight_A[a] times expert e(a)'s
    SwiGLU on x[t]. The A assignments are sorted by expert, sizes_E[e] of expert e; those
    past sum(sizes_E) count for nothing. `balanced`: the assignments per expert a balanced
    routing gives. `grouped`: "ragged" (jax.lax.ragged_dot: TPU's and GPU's grouped-matmul
    kernels), "blocks" (`moe_cpu.mixture_blocks`, half the balanced share of each expert in
    batched matmuls, the rest in blocks: on CPU the fastest split measured for routings from
    balanced to a third past it) or "auto" (blocks on CPU, where XLA computes ragged_dot as
    a masked product over every expert, E times the work; ragged elsewhere)."""
    if grouped == "auto":
        grouped = "blocks" if rules.platform() == "cpu" else "ragged"
    if grouped != "ragged":
        return moe_cpu.mixture_blocks(x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF,
                                      w_up_ExDxF, w_down_ExFxD, max(1, balanced // 2))
    x_AxD = x_TxD[token_A]
    h_AxF = _swiglu(jax.lax.ragged_dot(x_AxD, w_gate_ExDxF, sizes_E),
                    jax.lax.ragged_dot(x_AxD, w_up_ExDxF, sizes_E))
    y_AxD = jax.lax.ragged_dot(h_AxF, w_down_ExFxD, sizes_E)
    return _combine(x_TxD, y_AxD, token_A, weight_A)


def _combine(x_TxD, y_AxD, token_A, weight_A):
    """Each token's output: the sum of its assignments' expert outputs, weighted."""
    return jnp.zeros_like(x_TxD).at[token_A].add(y_AxD * weight_A[:, None])


def over_expert_axis(x_BxLxD, weights_BxLxK, experts_BxLxK, w_gate_ExDxF, w_up_ExDxF,
                     w_down_ExFxD):
    """Dropless dispatch with the experts split over the mesh's expert axis (`expert_shard`
    on each device, in shard_map): tokens stay split over the batch axes (expert among
    them) and the sequence's context axis; each device holds E / n experts, whole along
    d_model (gathered over fsdp on the way in) and split along their width over tensor."""
    token_axes = ("batch", "act_sequence", None)
    return rules.shard_map(
        functools.partial(expert_shard, expert_axes=rules.mesh_axes("expert"),
                          width_axes=rules.mesh_axes("mlp")),
        (("batch", "act_sequence", "act_embed"), token_axes, token_axes,
         ("expert", None, "mlp"), ("expert", None, "mlp"), ("expert", "mlp", None)),
        ("batch", "act_sequence", "act_embed"), check_vma=True)(
        x_BxLxD, weights_BxLxK, experts_BxLxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def expert_shard(x_BxLxD, weights_BxLxK, experts_BxLxK, w_gate_ExDxF, w_up_ExDxF,
                 w_down_ExFxD, expert_axes: tuple[str, ...], width_axes: tuple[str, ...]):
    """One device's part of `over_expert_axis`. Its A = T x k assignments (T local tokens)
    are sorted by expert, so by the device p that holds the expert, and laid out in a
    P x A x D buffer (row p: those for device p, in order; the rest zero); an all-to-all
    over the expert axis hands each device the rows for its experts from every device,
    which it runs through `mixture` (sorted by its expert, padding last), sums over
    the tensor axis (each device has a slice of the width), and sends back the same way.
    The buffers hold every assignment whatever the routing (nothing is dropped): P times
    the rows a balanced routing sends."""
    b, length, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(-1, d)
    local = w_gate_ExDxF.shape[0]  # the experts this device holds
    shards = jax.lax.axis_size(expert_axes)
    token_A, sorted_A, weight_A = _by_expert(weights_BxLxK, experts_BxLxK)
    n = sorted_A.shape[0]
    device_A = sorted_A // local
    sent_P = jnp.zeros(shards, jnp.int32).at[device_A].add(1)
    row_A = jnp.arange(n) - (jnp.cumsum(sent_P) - sent_P)[device_A]
    send_PxAxD = jnp.zeros((shards, n, d), x_TxD.dtype).at[device_A, row_A].set(x_TxD[token_A])
    # each row's expert among the receiver's; `local` marks an empty row (sorted last)
    send_PxA = jnp.full((shards, n), local, jnp.int32).at[device_A, row_A].set(sorted_A % local)
    got_RxD = jax.lax.all_to_all(send_PxAxD, expert_axes, 0, 0).reshape(-1, d)
    got_R = jax.lax.all_to_all(send_PxA, expert_axes, 0, 0).reshape(-1)
    order_R = jnp.argsort(got_R, stable=True)
    sizes_E = jnp.zeros(local, jnp.int32).at[got_R].add(1, mode="drop")
    y_RxD = mixture(got_RxD, order_R, jnp.ones(order_R.shape, got_RxD.dtype), sizes_E,
                    w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, -(-n // local))
    if width_axes:
        y_RxD = jax.lax.psum(y_RxD, width_axes)
    back_PxAxD = y_RxD.reshape(shards, n, d)
    y_AxD = jax.lax.all_to_all(back_PxAxD, expert_axes, 0, 0)[device_A, row_A]
    return _combine(x_TxD, y_AxD, token_A, weight_A).reshape(b, length, d)


def by_capacity(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                factor: float):
    """At most C assignments per expert (token order, first choices first within a token),
    in E x C x D buffers; returns (output T x D, the dropped fraction of assignments)."""
    tokens, k = experts_TxK.shape
    n_experts, d = w_gate_ExDxF.shape[0], x_TxD.shape[1]
    cap = capacity(tokens, k, n_experts, factor)
    expert_A = experts_TxK.reshape(-1)  # position t * k + j: token order, choices in order
    onehot_AxE = jax.nn.one_hot(expert_A, n_experts, dtype=jnp.int32)
    slot_A = jnp.sum((jnp.cumsum(onehot_AxE, axis=0) - 1) * onehot_AxE, axis=1)
    kept_A = slot_A < cap
    # Kept assignments fill their slot of the E*C buffer; dropped ones a spare row.
    row_A = jnp.where(kept_A, expert_A * cap + slot_A, n_experts * cap)
    token_A = jnp.arange(tokens * k) // k
    buffer_ExCxD = jnp.zeros((n_experts * cap + 1, d), x_TxD.dtype).at[row_A].set(
        x_TxD[token_A])[:-1].reshape(n_experts, cap, d)
    h_ExCxF = _swiglu(jnp.einsum("ecd,edf->ecf", buffer_ExCxD, w_gate_ExDxF),
                      jnp.einsum("ecd,edf->ecf", buffer_ExCxD, w_up_ExDxF))
    y_ExCxD = jnp.einsum("ecf,efd->ecd", h_ExCxF, w_down_ExFxD)
    y_AxD = jnp.concatenate([y_ExCxD.reshape(-1, d), jnp.zeros((1, d), y_ExCxD.dtype)])[row_A]
    weight_A = jnp.where(kept_A, weights_TxK.reshape(-1), 0).astype(y_AxD.dtype)
    return (_combine(x_TxD, y_AxD, token_A, weight_A),
            1.0 - jnp.mean(kept_A.astype(jnp.float32)))


def dense(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    """Every expert on every token, combined with the routing weights (zero off the top k)."""
    n_experts = w_gate_ExDxF.shape[0]
    combine_TxE = jnp.sum(jax.nn.one_hot(experts_TxK, n_experts, dtype=weights_TxK.dtype)
                          * weights_TxK[..., None], axis=1)
    h_TxExF = _swiglu(jnp.einsum("td,edf->tef", x_TxD, w_gate_ExDxF),
                      jnp.einsum("td,edf->tef", x_TxD, w_up_ExDxF))
    y_TxExD = jnp.einsum("tef,efd->ted", h_TxExF, w_down_ExFxD)
    return jnp.einsum("te,ted->td", combine_TxE, y_TxExD)


class LlamaMoE(Llama):
    """Family moe: the LLaMA block with a mixture of experts as its MLP."""

    @classmethod
    def make_mlp(cls, cfg: ml_collections.ConfigDict, std: float, out_std: float, dtype,
                 rngs: nnx.Rngs) -> nnx.Module:
        return MoE(cfg, std, out_std, dtype, rngs)
