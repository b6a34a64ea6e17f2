"""What every decoder-only family shares: a pre-norm residual block, the layer stack under
a scan, the embedding and the LM head. Nothing here names a family; each family module
(llama.py, gpt2.py) says which norm, attention and MLP its blocks use and how positions
enter.

The layer stack is created once with `nnx.vmap` (every parameter gains a leading `layers`
axis) and applied with `jax.lax.scan`, so compile time does not grow with depth.
Rematerialisation wraps one layer: "full" recomputes everything in the backward pass,
"save_matmuls" keeps the outputs of weight matmuls, "none" keeps all activations.

Parameter tree (what checkpoints and the Hugging Face mappings name): `embed`, the family's
own tables (e.g. `pos_embed`), `blocks/{attn_norm, attn, mlp_norm, mlp}`, `final_norm`, and
`lm_head` when the head is not tied to the embedding.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxlm.model import attention, context, counts, kv_cache, quantized
from jaxlm.model.layers import param
from jaxlm.parallel.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

ACT_AXES = ("batch", "act_sequence", "act_embed")


class PreNormBlock(nnx.Module):
    """Pre-norm residual block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

    def __init__(self, attn_norm: nnx.Module, attn: attention.Attention, mlp_norm: nnx.Module,
                 mlp: nnx.Module):
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def __call__(self, x_BxLxD, positions_BxL, mask, cache=None):
        """With `cache` (generation, see kv_cache.py) returns (x, cache updated)."""
        attn_out = self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask, cache)
        attn_BxLxD, cache = attn_out if cache is not None else (attn_out, None)
        x_BxLxD = constrain(x_BxLxD + attn_BxLxD, ACT_AXES)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        x_BxLxD = constrain(x_BxLxD, ACT_AXES)
        return x_BxLxD if cache is None else (x_BxLxD, cache)

    def routed(self, x_BxLxD, positions_BxL, mask):
        """A block whose MLP is a mixture of experts (jaxlm.model.moe): (its output, the
        layer's routing figures)."""
        h_BxLxD = constrain(x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask),
                            ACT_AXES)
        y_BxLxD, figures = self.mlp.apply(self.mlp_norm(h_BxLxD))
        return constrain(h_BxLxD + y_BxLxD, ACT_AXES), figures

    def activations(self, x_BxLxD, positions_BxL, mask) -> dict[str, jax.Array]:
        """The block's output ("out", B x L x D) with what it is made of: every head's
        attention output before the output projection ("heads", B x L x H x K) and the MLP's
        hidden units before its down projection ("units", B x L x F)."""
        heads_BxLxHxK = self.attn.heads(self.attn_norm(x_BxLxD), positions_BxL, mask)
        h_BxLxD = x_BxLxD + self.attn.output(heads_BxLxHxK)
        units_BxLxF = self.mlp.hidden(self.mlp_norm(h_BxLxD))
        return {"out": h_BxLxD + self.mlp.output(units_BxLxF), "heads": heads_BxLxHxK,
                "units": units_BxLxF}


class DecoderLM(nnx.Module):
    """A decoder-only language model. A family subclasses it and says what differs: its
    norm class (`norm`), its MLP class (`mlp`), its attention's options
    (`attention_options`: biases, rotary embeddings), and, with position tables,
    `init_positions` and `add_positions`."""

    norm: type  # (dim, eps) -> nnx.Module
    mlp: type  # (d_model, d_ff, std, out_std, dtype, rngs) -> nnx.Module
    attention_options: Callable[[ml_collections.ConfigDict], dict]

    @classmethod
    def make_norm(cls, cfg: ml_collections.ConfigDict) -> nnx.Module:
        return cls.norm(cfg.d_model, cfg.norm_eps)

    @classmethod
    def make_mlp(cls, cfg: ml_collections.ConfigDict, std: float, out_std: float, dtype,
                 rngs: nnx.Rngs) -> nnx.Module:
        return cls.mlp(cfg.d_model, cfg.d_ff, std, out_std, dtype, rngs)

    @classmethod
    def make_block(cls, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> PreNormBlock:
        """One layer, its parameters drawn from the layer's rngs."""
        dtype = jnp.dtype(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # residual projections, as GPT-2
        return PreNormBlock(
            attn_norm=cls.make_norm(cfg),
            attn=attention.Attention(
                d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                head_dim=counts.head_dim(cfg), std=cfg.init_std, out_std=out_std, dtype=dtype,
                backend=cfg.attention, rngs=rngs, **cls.attention_options(cfg)),
            mlp_norm=cls.make_norm(cfg),
            mlp=cls.make_mlp(cfg, cfg.init_std, out_std, dtype, rngs))

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the graphdef
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.init_positions(cfg, rngs)
        make_block = self.make_block

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> PreNormBlock:
            return make_block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = self.make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                 cfg.init_std)

    def init_positions(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
        """Position tables, created between the embedding and the blocks; none by default
        (positions enter through the attention, e.g. rotary embeddings)."""

    def add_positions(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        return x_BxLxD

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, cache: kv_cache.KVCache | None = None):
        """Logits (float32, B x L x V). Positions default to 0..L-1; segment ids (documents
        packed in one row, 0 = padding) restrict attention to the same document.
        With `cache` (generation): the tokens are written into the KV cache and attend to
        it; returns (logits of the last position only, B x 1 x V; the updated cache)."""
        if cache is None:
            return self.head_logits(self.hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL))
        positions_BxL = _positions(tokens_BxL, positions_BxL)
        x_BxLxD = self._embed(tokens_BxL, positions_BxL)
        x_BxLxD, cache = kv_cache.run_blocks(self.blocks, self.cfg, x_BxLxD, positions_BxL, cache)
        # generation needs the next token's logits only
        return self.head_logits(self.final_norm(x_BxLxD[:, -1:])), cache

    def head_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """The LM head over final-normed hidden states (any run of positions; the blockwise
        loss calls it block by block): float32 logits, B x L x V."""
        dt = jnp.dtype(self.cfg.dtype)
        head_DxV = (quantized.weight(self, "embed", dt).T if self.cfg.tie_embeddings
                    else quantized.weight(self, "lm_head", dt))
        logits = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(dt),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "act_sequence", "act_vocab"))

    def hidden_states(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                      segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """The final-normed hidden states (B x L x D, compute dtype) the LM head reads; a
        classification head pools them (jaxlm/finetune/classify.py)."""
        return self.routed_hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL)[0]

    def routed_hidden_states(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                             segment_ids_BxL: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """(hidden_states, the routing figures of every layer stacked along a leading layers
        axis: jaxlm.model.moe.RoutingFigures; None for a dense model)."""
        cfg = self.cfg
        length = tokens_BxL.shape[1]
        positions_BxL = _positions(tokens_BxL, positions_BxL)
        shards = context.shards()
        order = context.balanced_order(length, shards) if shards > 1 else None
        if order is not None:  # context parallelism: the rows in the balanced order
            tokens_BxL, positions_BxL = tokens_BxL[:, order], positions_BxL[:, order]
            if segment_ids_BxL is not None:
                segment_ids_BxL = segment_ids_BxL[:, order]
        mask = attention.prepare_mask(cfg, segment_ids_BxL, length, order=order)
        x_BxLxD, figures = run_blocks(self.blocks, cfg, self._embed(tokens_BxL, positions_BxL),
                                      positions_BxL, mask, routed=cfg.n_experts > 0)
        x_BxLxD = self.final_norm(x_BxLxD)
        if order is not None:
            x_BxLxD = constrain(x_BxLxD[:, np.argsort(order)], ACT_AXES)
        return x_BxLxD, figures

    def layer_statistics(self, fn: Callable[[jax.Array, dict], Any],
                         tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                         segment_ids_BxL: jax.Array | None = None) -> Any:
        """fn(a block's input B x L x D, block.activations(input)) of every block, stacked
        along a leading layers axis: what each block does and is made of (pruning's
        calibration, jaxlm/compress/prune.py). Without context parallelism."""
        positions_BxL = _positions(tokens_BxL, positions_BxL)
        mask = attention.prepare_mask(self.cfg, segment_ids_BxL, tokens_BxL.shape[1])
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x_BxLxD, layer_state):
            acts = nnx.merge(graphdef, layer_state).activations(x_BxLxD, positions_BxL, mask)
            return acts["out"], fn(x_BxLxD, acts)

        _, stats = jax.lax.scan(layer, self._embed(tokens_BxL, positions_BxL), stacked)
        return stats

    def _embed(self, tokens_BxL, positions_BxL):
        # Gather the table's fsdp shards first (as FSDP does for any weight): a lookup into a
        # table sharded along embed would come out sharded along embed, not batch.
        rows_BxLxD = quantized.take_rows(self, "embed", tokens_BxL, ("vocab", None))
        x_BxLxD = self.add_positions(rows_BxLxD, positions_BxL)
        return constrain(x_BxLxD.astype(jnp.dtype(self.cfg.dtype)), ACT_AXES)

def run_blocks(blocks: nnx.Module, cfg: ml_collections.ConfigDict, x_BxLxD: jax.Array,
               *layer_args, n_layers: int | None = None, routed: bool = False) -> Any:
    """x through a layer stack made by nnx.vmap (every parameter with a leading `layers`
    axis): each block is called as block(x, *layer_args); under a scan when
    cfg.scan_layers, with cfg.remat's rematerialisation. `n_layers`: the stack's depth
    (default cfg.n_layers). `routed` (a mixture-of-experts stack): block.routed(x, ...)
    instead, returning (x, every layer's routing figures stacked along a leading axis);
    otherwise (x, None)."""
    graphdef, stacked = nnx.split(blocks)

    def layer(x, layer_state):
        block = nnx.merge(graphdef, layer_state)
        return block.routed(x, *layer_args) if routed else (block(x, *layer_args), None)

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat],
                               prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        return jax.lax.scan(layer, x_BxLxD, stacked)
    figures = []
    for i in range(n_layers or cfg.n_layers):
        x_BxLxD, f = layer(x_BxLxD, jax.tree.map(lambda a, i=i: a[i], stacked))
        figures.append(f)
    return x_BxLxD, (jax.tree.map(lambda *f: jnp.stack(f), *figures) if routed else None)


def _positions(tokens_BxL: jax.Array, positions_BxL: jax.Array | None) -> jax.Array:
    if positions_BxL is None:
        return jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    return positions_BxL
