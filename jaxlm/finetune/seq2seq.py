"""Text-to-text fine-tuning of an encoder-decoder: the objective and greedy decoding for the
exact-match evaluation.

The loss is span corruption's (jaxlm.train.seq2seq.loss_sums): cross-entropy of the real
decoder targets, teacher-forced, over packed row pairs (seq2seq_data.py). Evaluation adds
greedy generation of every held-out input: the encoder runs once, the decoder starts from
the decoder start id and appends the argmax token with the model's cache (`init_cache`,
`decode_step`) inside one `lax.while_loop` that ends when every row has produced EOS or
`max_new_tokens` tokens. (jaxlm.infer.seq2seq generates for `jaxlm generate`; the layers
keep fine-tuning and inference apart, so this is the greedy path alone.) A prediction is
exact when its decoded text, stripped, equals the decoded target's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.data.tokenizers import Tokenizer


def greedy(graphdef: Any, params: Any, tokens_BxS: jax.Array, segments_BxS: jax.Array, *,
           start_id: int, eos_id: int, max_new_tokens: int) -> jax.Array:
    """int32 B x max_new_tokens: each row's greedy tokens after the start id, its EOS
    included, 0 after it."""
    model = nnx.merge(graphdef, params)
    rows = tokens_BxS.shape[0]
    enc_BxSxD = model.encode(tokens_BxS, None, segments_BxS)
    cache = model.init_cache(enc_BxSxD, segments_BxS, max_new_tokens)

    def step(carry):
        i, cache, token_B, done_B, out_BxT = carry
        logits_Bx1xV, cache = model.decode_step(token_B[:, None], cache)
        token_B = jnp.where(done_B, 0, jnp.argmax(logits_Bx1xV[:, 0], axis=-1).astype(jnp.int32))
        done_B = done_B | (token_B == eos_id)
        return i + 1, cache, token_B, done_B, out_BxT.at[:, i].set(token_B)

    def going(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[3])

    start = (jnp.int32(0), cache, jnp.full((rows,), start_id, jnp.int32),
             jnp.zeros((rows,), bool), jnp.zeros((rows, max_new_tokens), jnp.int32))
    return jax.lax.while_loop(going, step, start)[4]


def until_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """`ids` up to (without) the first EOS."""
    stop = np.flatnonzero(ids == eos_id)
    return ids[:stop[0]] if stop.size else ids


def exact(tokenizer: Tokenizer, predicted: np.ndarray, targets: np.ndarray, eos_id: int) -> bool:
    """Whether the decoded prediction, stripped, equals the decoded target, stripped."""
    return tokenizer.decode(until_eos(predicted, eos_id)).strip() == \
        tokenizer.decode(until_eos(targets, eos_id)).strip()
