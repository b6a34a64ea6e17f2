"""The `splash` attention backend: Pallas splash attention (TPU flash attention with block
sparsity), forward and backward, for causal and bidirectional masks, documents separated by
segment ids, and grouped-query attention that never repeats K/V.

The kernel cannot be partitioned automatically, so it runs under shard_map over the mesh in
context (jaxlm.parallel.rules.shard_map, by logical axis names; one device without a mesh):
rows split over the batch axes, kv heads over the head axis where they divide it, otherwise
the query heads of each kv group (MQA on a tensor-parallel mesh: K/V replicated along it). Inside, each
device runs the MQA kernel once per (row, kv head): the R = H/G query heads that share a kv
head attend to it together, so K/V stay G heads wide in memory.

On TPU the kernel is compiled by Mosaic; on any other platform it runs in Pallas interpret
mode (slow; it is how the tests check it on a CPU). The platform is the mesh's, so `jaxlm
compile` for a TPU topology on a CPU host lowers the real kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxlm.errors import ConfigError
from jaxlm.parallel import rules

TPU_LANES = 128  # Mosaic tiles: the kv block is a multiple of 128 on TPU


@struct.dataclass
class SplashMask:
    """What every layer's splash attention takes, built once per step (attention.prepare_mask):
    the rows' segment ids (None: one document per row) and the static block sizes."""
    segment_ids_BxL: jax.Array | None
    block_q: int = struct.field(pytree_node=False, default=512)
    block_kv: int = struct.field(pytree_node=False, default=512)


def block_size(length: int, configured: int = 0) -> int:
    """The splash tile for a sequence of `length` (a multiple of 128: the kernel's kv tiles
    are whole lanes): model.splash_block when set and it divides the length (validation
    holds the training length to that; a generation prefill's may differ), else the largest
    of 512, 256, 128 that divides it (512 is what TPU v4/v5 run fastest at the lengths LLMs
    train on)."""
    if configured and length % configured == 0:
        return configured
    return next(b for b in (512, 256, 128) if length % b == 0)


def supports(length: int) -> bool:
    """Whether splash can run a sequence of `length` (whole 128-lane tiles)."""
    return length % TPU_LANES == 0


def splash_prepare(segment_ids_BxL: jax.Array | None, length: int, block: int = 0) -> SplashMask:
    size = block_size(length, block)
    ids = None if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
    return SplashMask(ids, size, size)


def _kernel(heads: int, length: int, causal: bool, block_q: int, block_kv: int,
            interpret: bool):
    """The MQA kernel for `heads` query heads over one kv head, built at trace time (its
    mask tables are constants of the traced program; the numpy mask processing behind them
    is cached by Pallas per shape)."""
    one = (splash.CausalMask((length, length)) if causal
           else splash.FullMask((length, length)))
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([one] * heads), block_sizes=blocks, interpret=interpret)


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

    def local(q_bxgxrxLxK, k_bxgxLxK, v_bxgxLxK, ids_bxL):
        kernel = _kernel(q_bxgxrxLxK.shape[2], length, causal, mask.block_q, mask.block_kv,
                         interpret)

        def row(q_gxrxLxK, k_gxLxK, v_gxLxK, ids_L):
            segments = None if ids_L is None else splash.SegmentIds(ids_L, ids_L)
            return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=segments))(
                q_gxrxLxK, k_gxLxK, v_gxLxK)

        return jax.vmap(row)(q_bxgxrxLxK, k_bxgxLxK, v_bxgxLxK, ids_bxL)

    q_axes, kv_axes, ids_axes = logical_axes(b, g, r)
    out = rules.shard_map(local, (q_axes, kv_axes, kv_axes, None if ids is None else ids_axes),
                          q_axes)(q, k, v, ids)
    return out.reshape(b, h, length, kd).transpose(0, 2, 1, 3)


def logical_axes(rows: int, kv_heads: int, heads_per_kv: int):
    """Logical axes of (B x G x R x L x K queries, B x G x L x K keys/values, B x L ids) for
    the kernel's shard_map: rows over the batch axes (where they divide them: a one-prompt
    prefill is not split); kv heads over the head axis where they divide it, else each
    group's query heads (K/V then replicated along it), else neither."""
    batch = "batch" if rows % rules.logical_size("batch") == 0 else None
    ways = rules.logical_size("act_kv_heads")
    if ways > 1 and kv_heads % ways == 0:
        return (batch, "act_kv_heads"), (batch, "act_kv_heads"), (batch,)
    if ways > 1 and heads_per_kv % ways == 0:
        return (batch, None, "act_heads"), (batch,), (batch,)
    return (batch,), (batch,), (batch,)
