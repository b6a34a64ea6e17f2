"""The dropless mixture on CPU (`mixture_blocks`), where XLA computes jax.lax.ragged_dot as
a masked product over every expert (E times the work): the batched matmuls of a capacity
layout for the bulk, and loops of small blocks for the rest, so that no assignment is
dropped and none is multiplied by another expert's weights.

Each expert's first C assignments (C: the caller's; `moe.mixture` gives half a balanced
routing's share) fill an E x C x D buffer that runs through three batched matmuls, as
capacity dispatch does; the assignments past an expert's first C run through the same
SwiGLU in blocks of up to 128 rows, in loops over the experts and, within each, over as
many blocks as it has past C (its weights sliced once per expert). The backward pass is
written out (a custom VJP) so that the loops add their blocks' gradients into the batched
matmuls' in place, and the layer's buffers never hold more than E x C rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _varying(*arrays: jax.Array) -> set[str]:
    """The shard_map axes over which any of `arrays` differs between devices."""
    return set().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))


def _vary(a: jax.Array, axes: set[str]) -> jax.Array:
    """`a` marked as differing between devices over `axes` too (a loop's carry must start as
    its body leaves it)."""
    missing = tuple(sorted(axes - _varying(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def _cotangent_of(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the shard_map axes along which its primal is the same on
    every device (what JAX's own transposition of that broadcast does)."""
    axes = tuple(sorted(_varying(ct) - _varying(primal)))
    return (jax.lax.psum(ct, axes) if axes else ct).astype(primal.dtype)


def block_rows(capacity: int) -> int:
    """Rows per block of the loop over the assignments past capacity."""
    return int(min(128, max(8, capacity)))


def _slots(token_A, weight_A, sizes_E, capacity: int):
    """The E x C buffer's slots, as `_block` gives a block's rows: each expert's first C
    rows of the sorted assignments, those past its own masked."""
    first_Ex1 = (jnp.cumsum(sizes_E) - sizes_E)[:, None]
    return _block(token_A, weight_A, first_Ex1, first_Ex1 + sizes_E[:, None], capacity)


def _past_capacity(sizes_E, capacity: int, size: int):
    """Each expert's assignments past its first C: (first row, end row, blocks of `size`)."""
    first_E = jnp.cumsum(sizes_E) - sizes_E
    over_E = jnp.maximum(sizes_E - capacity, 0)
    return first_E + capacity, first_E + sizes_E, -(-over_E // size)


def _block(token_A, weight_A, row, end, size: int):
    """The `size` rows of the sorted assignments from `row` (with a leading axis when row
    and end have one): their tokens (int32's largest, out of range, from `end` on),
    weights (0 there) and rows (A there)."""
    assignments = token_A.shape[0]
    row_S = row + jnp.arange(size)
    mine_S = row_S < end
    row_S = jnp.minimum(row_S, assignments - 1)
    return (jnp.where(mine_S, token_A[row_S], jnp.iinfo(jnp.int32).max),
            jnp.where(mine_S, weight_A[row_S], 0), jnp.where(mine_S, row_S, assignments))


def _take(x_TxD, token):
    """x's rows of `token` (zero rows where it is out of range)."""
    return x_TxD.at[token].get(mode="fill", fill_value=0)


def mixture_blocks(x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF,
                   w_down_ExFxD, capacity: int):
    """out[t] = the sum over the assignments a of token t of weight_A[a] times the SwiGLU of
    expert e(a) on x[t]: the A assignments sorted by expert, sizes_E[e] of expert e (those
    past sum(sizes_E) count for nothing); `capacity` assignments per expert in the batched
    matmuls, the rest in blocks."""
    return _mixture(x_TxD, token_A.astype(jnp.int32), weight_A, sizes_E.astype(jnp.int32),
                    w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, capacity)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _mixture(x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
             capacity):
    return _mixture_fwd(x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF,
                        w_down_ExFxD, capacity)[0]


def _mixture_fwd(x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                 capacity):
    token_ExC, weight_ExC, _ = _slots(token_A, weight_A, sizes_E, capacity)
    buffer_ExCxD = _take(x_TxD, token_ExC)
    gate_ExCxF = jnp.einsum("ecd,edf->ecf", buffer_ExCxD, w_gate_ExDxF)
    up_ExCxF = jnp.einsum("ecd,edf->ecf", buffer_ExCxD, w_up_ExDxF)
    y_ExCxD = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate_ExCxF) * up_ExCxF, w_down_ExFxD)
    out_TxD = jnp.zeros_like(x_TxD).at[token_ExC].add(
        y_ExCxD * weight_ExC[..., None].astype(y_ExCxD.dtype), mode="drop")
    size = block_rows(capacity)
    row_E, end_E, blocks_E = _past_capacity(sizes_E, capacity, size)

    def expert(e, out_TxD):
        w_gate_DxF, w_up_DxF, w_down_FxD = w_gate_ExDxF[e], w_up_ExDxF[e], w_down_ExFxD[e]

        def block(j, out_TxD):
            token_S, weight_S, _ = _block(token_A, weight_A, row_E[e] + j * size, end_E[e],
                                          size)
            x_SxD = _take(x_TxD, token_S)
            h_SxF = jax.nn.silu(x_SxD @ w_gate_DxF) * (x_SxD @ w_up_DxF)
            y_SxD = (h_SxF @ w_down_FxD) * weight_S[:, None].astype(x_TxD.dtype)
            return out_TxD.at[token_S].add(y_SxD.astype(out_TxD.dtype), mode="drop")
        return jax.lax.fori_loop(0, blocks_E[e], block, out_TxD)

    inputs = (x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    out_TxD = jax.lax.fori_loop(0, sizes_E.shape[0], expert,
                                _vary(out_TxD, _varying(*inputs)))
    return out_TxD, (inputs, buffer_ExCxD, gate_ExCxF, up_ExCxF)


def _swiglu_grads(x_SxD, gate_SxF, up_SxF, weight_S, dout_SxD, w_gate_DxF, w_up_DxF,
                  w_down_FxD, batched: str = ""):
    """The gradients of weight * SwiGLU(x) (from its pre-activations gate and up) for rows
    S (with a leading expert axis when `batched` is "e"): (dx, dweight, dw_gate, dw_up,
    dw_down)."""
    b = batched
    h_SxF = jax.nn.silu(gate_SxF) * up_SxF
    dh_SxF = jnp.einsum(f"{b}sd,{b}fd->{b}sf", dout_SxD, w_down_FxD)
    dweight_S = jnp.sum(h_SxF * dh_SxF, axis=-1)
    weight_Sx1 = weight_S[..., None].astype(dout_SxD.dtype)
    dw_down_FxD = jnp.einsum(f"{b}sf,{b}sd->{b}fd", h_SxF, dout_SxD * weight_Sx1)
    dh_SxF = dh_SxF * weight_Sx1
    sig_SxF = jax.nn.sigmoid(gate_SxF)
    dup_SxF = dh_SxF * gate_SxF * sig_SxF
    dgate_SxF = dh_SxF * up_SxF * sig_SxF * (1 + gate_SxF * (1 - sig_SxF))
    dw_gate_DxF = jnp.einsum(f"{b}sd,{b}sf->{b}df", x_SxD, dgate_SxF)
    dw_up_DxF = jnp.einsum(f"{b}sd,{b}sf->{b}df", x_SxD, dup_SxF)
    dx_SxD = (jnp.einsum(f"{b}sf,{b}df->{b}sd", dgate_SxF, w_gate_DxF)
              + jnp.einsum(f"{b}sf,{b}df->{b}sd", dup_SxF, w_up_DxF))
    return dx_SxD, dweight_S, dw_gate_DxF, dw_up_DxF, dw_down_FxD


def _mixture_bwd(capacity, saved, dout_TxD):
    inputs, buffer_ExCxD, gate_ExCxF, up_ExCxF = saved
    x_TxD, token_A, weight_A, sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD = inputs
    assignments = token_A.shape[0]
    token_ExC, weight_ExC, row_ExC = _slots(token_A, weight_A, sizes_E, capacity)
    dbuffer, dweight_ExC, dw_gate, dw_up, dw_down = _swiglu_grads(
        buffer_ExCxD, gate_ExCxF, up_ExCxF, weight_ExC, _take(dout_TxD, token_ExC),
        w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, batched="e")
    dx_TxD = jnp.zeros_like(x_TxD).at[token_ExC].add(dbuffer.astype(x_TxD.dtype), mode="drop")
    dweight_A = jnp.zeros(assignments, dweight_ExC.dtype).at[row_ExC].set(dweight_ExC,
                                                                           mode="drop")
    size = block_rows(capacity)
    row_E, end_E, blocks_E = _past_capacity(sizes_E, capacity, size)
    axes = _varying(*inputs, dout_TxD)

    def expert(e, grads):
        dx_TxD, dweight_A, dw_gate, dw_up, dw_down = grads
        w_gate_DxF, w_up_DxF, w_down_FxD = w_gate_ExDxF[e], w_up_ExDxF[e], w_down_ExFxD[e]

        def block(j, grads):
            dx_TxD, dweight_A, dg_DxF, du_DxF, dd_FxD = grads
            token_S, weight_S, row_S = _block(token_A, weight_A, row_E[e] + j * size,
                                              end_E[e], size)
            x_SxD = _take(x_TxD, token_S)
            dx_SxD, dweight_S, dg, du, dd = _swiglu_grads(
                x_SxD, x_SxD @ w_gate_DxF, x_SxD @ w_up_DxF, weight_S,
                _take(dout_TxD, token_S), w_gate_DxF, w_up_DxF, w_down_FxD)
            return (dx_TxD.at[token_S].add(dx_SxD.astype(dx_TxD.dtype), mode="drop"),
                    dweight_A.at[row_S].set(dweight_S.astype(dweight_A.dtype), mode="drop"),
                    dg_DxF + dg, du_DxF + du, dd_FxD + dd)

        dx_TxD, dweight_A, dg_DxF, du_DxF, dd_FxD = jax.lax.fori_loop(
            0, blocks_E[e], block, (dx_TxD, dweight_A, dw_gate[e], dw_up[e], dw_down[e]))
        return (dx_TxD, dweight_A, dw_gate.at[e].set(dg_DxF), dw_up.at[e].set(du_DxF),
                dw_down.at[e].set(dd_FxD))

    grads = jax.lax.fori_loop(0, sizes_E.shape[0], expert, tuple(
        _vary(g, axes) for g in (dx_TxD, dweight_A, dw_gate, dw_up, dw_down)))
    dx_TxD, dweight_A, dw_gate, dw_up, dw_down = grads
    return (_cotangent_of(dx_TxD, x_TxD), None, _cotangent_of(dweight_A, weight_A), None,
            _cotangent_of(dw_gate, w_gate_ExDxF), _cotangent_of(dw_up, w_up_ExDxF),
            _cotangent_of(dw_down, w_down_ExFxD))


_mixture.defvjp(_mixture_fwd, _mixture_bwd)
