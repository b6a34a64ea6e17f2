"""Context parallelism's layout: how a row's positions are spread over the `context` axis.

When the mesh in context splits activations' sequence axis (`act_sequence` -> `context`, c
ways), a causal row would leave device 0 with the fewest keys to attend to and device c-1
with the most. The decoder therefore runs each row in a load-balanced order: the row is cut
into 2c chunks and device i holds chunks i and 2c-1-i (one early, one late), so every
device attends to the same number of keys. Token-wise work (embeddings, MLPs, norms, the
rotary angles, which read the positions) does not care about the order; attention masks by
the original order (`order`), and the final hidden states are put back in the original
order. Bidirectional rows (encoders) keep their order: every device sees every key anyway.
"""

from __future__ import annotations

import numpy as np

from jaxlm.parallel import rules


def shards() -> int:
    """How many ways the mesh in context splits a sequence (1 outside a mesh)."""
    return rules.logical_size("act_sequence")


def balanced_order(length: int, context: int) -> np.ndarray:
    """order[p] = the original position held at position p of the balanced layout: chunks
    0, 2c-1, 1, 2c-2, ..., c-1, c of length/(2c) positions each."""
    chunk = length // (2 * context)
    chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])
