"""`jaxlm bench data`: the loader alone, batches/s and tokens/s of the training pipeline."""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from jaxlm.bench.table import print_table
from jaxlm.data import pipeline, sources
from jaxlm.train.validate import validate


def bench_data(cfg: ml_collections.ConfigDict, batches: int = 2000) -> dict[str, float]:
    """The loader alone: batches/s and tokens/s of `make_iterator` on this host, after the
    corpus is built and one batch has warmed it up."""
    validate(cfg, jax.device_count())
    sources.prepare_all(cfg.data)
    data_iter = pipeline.make_iterator(cfg.data)
    next(data_iter)
    real = slots = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(data_iter)
        real += int(np.count_nonzero(batch["segment_ids"]))
        slots += batch["segment_ids"].size
    seconds = time.perf_counter() - start
    data_iter.close()
    figures = {"tokens_per_sec": slots / seconds, "real_tokens_per_sec": real / seconds,
               "packing_efficiency": real / slots, "batches_per_sec": batches / seconds}
    print_table([
        ("config", f"dataset={cfg.data.dataset} tokenizer={cfg.data.tokenizer} "
                   f"packing={cfg.data.packing} seq={cfg.data.seq_len} batch={cfg.data.global_batch_size}"),
        (f"batches/s ({batches} batches)", f"{batches / seconds:,.1f}"),
        ("tokens/s (all slots)", f"{slots / seconds:,.0f}"),
        ("real tokens/s", f"{real / seconds:,.0f}"),
        ("packing efficiency", f"{100 * real / slots:.2f}%"),
    ])
    return figures
