"""The `splash` attention backend: Pallas splash attention (TPU flash attention with block
sparsity), forward and backward, for causal and bidirectional masks, documents separated by
segment ids, and grouped-query attention that never repeats K/V.

The kernel cannot be partitioned automatically, so it runs under shard_map over the mesh in
context (jaxlm.parallel.rules.shard_map, by logical axis names; one device without a mesh):
rows split over the batch axes, kv heads over the head axis where they divide it, otherwise
the query heads of each kv group (MQA on a tensor-parallel mesh: K/V replicated along it).
Inside, each device runs the MQA kernel once per (row, kv head): the R = H/G query heads
that share a kv head attend to it together, so K/V stay G heads wide in memory. Under
context parallelism each device all-gathers the keys and values of its rows
(`_context_local`).

On TPU the kernel is compiled by Mosaic; on any other platform it runs in Pallas interpret
mode (slow; it is how the tests check it on a CPU). The platform is the mesh's, so `jaxlm
compile` for a TPU topology on a CPU host lowers the real kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxlm.errors import ConfigError
from jaxlm.model import context
from jaxlm.parallel import rules

TPU_LANES = 128  # Mosaic tiles: the kv block is a multiple of 128 on TPU


@struct.dataclass
class SplashMask:
    """What every layer's splash attention takes, built once per step (attention.prepare_mask):
    the rows' segment ids (None: one document per row), the static block size and, under
    context parallelism, the context axis size (rows split over it; causal rows in
    context.balanced_order)."""
    segment_ids_BxL: jax.Array | None
    block: int = struct.field(pytree_node=False, default=512)
    context: int = struct.field(pytree_node=False, default=1)


def block_size(length: int, configured: int = 0) -> int:
    """The splash tile for a sequence of `length` (a multiple of 128: the kernel's kv tiles
    are whole lanes): model.splash_block when set and it divides the length (validation
    holds the training length to that; a generation prefill's may differ), else the largest
    of 512, 256, 128 that divides it (512 is what TPU v4/v5 run fastest at the lengths LLMs
    train on)."""
    if configured and length % configured == 0:
        return configured
    return next(b for b in (512, 256, 128) if length % b == 0)


def supports(length: int, shards: int = 1) -> bool:
    """Whether splash can run a sequence of `length` split `shards` ways (whole 128-lane
    tiles; under context parallelism, in each of the 2 x shards chunks)."""
    return length % (TPU_LANES * (2 * shards if shards > 1 else 1)) == 0


def splash_prepare(segment_ids_BxL: jax.Array | None, length: int, block: int = 0,
                   context: int = 1) -> SplashMask:
    chunk = length // (2 * context) if context > 1 else length  # what one kernel call sees
    ids = None if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    return SplashMask(ids, block_size(chunk, block), context)


def _kernel(heads: int, one: splash.Mask, block: int, interpret: bool):
    """The MQA kernel for `heads` query heads over one kv head, each masked by `one` (a
    q x kv mask), built at trace time (its mask tables are constants of the traced program;
    the numpy mask processing behind them is cached by Pallas per shape)."""
    blocks = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([one] * heads), block_sizes=blocks, interpret=interpret)


def _attend(kernel, q_bxgxrxQxK, k_bxgxNxK, v_bxgxNxK, q_ids_bxQ, kv_ids_bxN):
    """The kernel per row and kv head (queries of a kv head's group together)."""
    def row(q_gxrxQxK, k_gxNxK, v_gxNxK, q_ids, kv_ids):
        segments = None if q_ids is None else splash.SegmentIds(q_ids, kv_ids)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=segments))(
            q_gxrxQxK, k_gxNxK, v_gxNxK)
    return jax.vmap(row)(q_bxgxrxQxK, k_bxgxNxK, v_bxgxNxK, q_ids_bxQ, kv_ids_bxN)


def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask: SplashMask, causal: bool = True):
    b, length, h, kd = q_BxLxHxK.shape
    g = k_BxLxGxK.shape[2]
    r = h // g
    where = rules.platform()
    if where == "gpu":
        raise ConfigError("config.model.attention: 'splash' is TPU attention; on NVIDIA GPUs "
                          "use 'cudnn'")
    interpret = where != "tpu"
    # B x G x R x L x K queries (scaled: the kernel does not scale), B x G x L x K keys/values.
    q = (q_BxLxHxK * jnp.asarray(kd ** -0.5, q_BxLxHxK.dtype)).transpose(0, 2, 1, 3).reshape(
        b, g, r, length, kd)
    k = k_BxLxGxK.transpose(0, 2, 1, 3)
    v = v_BxLxGxK.transpose(0, 2, 1, 3)
    ids = mask.segment_ids_BxL

    if mask.context == 1:
        def local(q_l, k_l, v_l, ids_l):
            one = (splash.CausalMask((length, length)) if causal
                   else splash.FullMask((length, length)))
            return _attend(_kernel(q_l.shape[2], one, mask.block, interpret), q_l, k_l, v_l,
                           ids_l, ids_l)
    else:
        def local(q_l, k_l, v_l, ids_l):
            return _context_local(q_l, k_l, v_l, ids_l, length, mask, causal, interpret)

    q_axes, kv_axes, ids_axes = logical_axes(b, g, r, mask.context > 1)
    out = rules.shard_map(local, (q_axes, kv_axes, kv_axes, None if ids is None else ids_axes),
                          q_axes)(q, k, v, ids)
    return out.reshape(b, h, length, kd).transpose(0, 2, 1, 3)


def _context_local(q_bxgxrxQxK, k_bxgxQxK, v_bxgxQxK, ids_bxQ, length: int, mask: SplashMask,
                   causal: bool, interpret: bool):
    """One device's share of a row split over the context axis (Q = L / c positions): its
    queries attend to the keys and values gathered from the whole axis.

    Bidirectional: one kernel call over every key. Causal (the balanced order, chunks i and
    2c-1-i of L/2c positions here): the gathered keys are put back in their original order,
    and each of the two query chunks j is one kernel call over a window of n keys (n = L/2
    for the early chunk, L for the late one) rolled so that keys 0 .. (j+1)L/2c - 1 fill its
    end: a static causal mask with offset n - L/2c is then exact, and the keys rolled round
    to the window's start (later than the chunk) are masked by a segment id no query has."""
    c = mask.context
    axes = rules.mesh_axes("act_sequence")
    axis = axes[0] if len(axes) == 1 else axes
    heads = q_bxgxrxQxK.shape[2]
    q_ids = jnp.zeros(q_bxgxrxQxK.shape[:1] + q_bxgxrxQxK.shape[3:4], jnp.int32) \
        if ids_bxQ is None else ids_bxQ
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
    k_all, v_all, kv_ids = gather(k_bxgxQxK, axis=2), gather(v_bxgxQxK, axis=2), \
        gather(q_ids, axis=1)
    if not causal:
        one = splash.FullMask((q_bxgxrxQxK.shape[3], length))
        return _attend(_kernel(heads, one, mask.block, interpret), q_bxgxrxQxK, k_all, v_all,
                       q_ids, kv_ids)
    original = np.argsort(context.balanced_order(length, c))
    k_all, v_all, kv_ids = k_all[:, :, original], v_all[:, :, original], kv_ids[:, original]
    chunk = length // (2 * c)
    device = jax.lax.axis_index(axis)
    outs = []
    for half, (j, n) in enumerate(((device, length // 2), (2 * c - 1 - device, length))):
        rows = slice(half * chunk, (half + 1) * chunk)
        shift = n - (j + 1) * chunk  # key t sits at t + shift of the window
        window_ids = jnp.roll(kv_ids, shift, axis=1)[:, :n]
        window_ids = jnp.where(jnp.arange(n) < shift, -1, window_ids)  # rolled round: later
        one = splash.CausalMask((chunk, n), offset=n - chunk)
        outs.append(_attend(_kernel(heads, one, mask.block, interpret),
                            q_bxgxrxQxK[:, :, :, rows], jnp.roll(k_all, shift, axis=2)[:, :, :n],
                            jnp.roll(v_all, shift, axis=2)[:, :, :n], q_ids[:, rows],
                            window_ids))
    return jnp.concatenate(outs, axis=3)


def logical_axes(rows: int, kv_heads: int, heads_per_kv: int, split_sequence: bool = False):
    """Logical axes of (B x G x R x L x K queries, B x G x L x K keys/values, B x L ids) for
    the kernel's shard_map: rows over the batch axes (where they divide them: a one-prompt
    prefill is not split); kv heads over the head axis where they divide it, else each
    group's query heads (K/V then replicated along it), else neither; the sequence over the
    context axis under context parallelism."""
    batch = "batch" if rows % rules.logical_size("batch") == 0 else None
    seq = "act_sequence" if split_sequence else None
    ways = rules.logical_size("act_kv_heads")
    g, r = None, None
    if ways > 1 and kv_heads % ways == 0:
        g = "act_kv_heads"
    elif ways > 1 and heads_per_kv % ways == 0:
        r = "act_heads"
    return (batch, g, r, seq, None), (batch, g, seq, None), (batch, seq)
