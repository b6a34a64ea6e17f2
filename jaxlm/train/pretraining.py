"""Which pretraining task a config runs: objective.name's (causal or masked LM:
jaxlm.train.lm; span corruption: jaxlm.train.seq2seq), distilled from distill.teacher or
distill.cache when one is set (jaxlm.train.distill). `jaxlm train`, `jaxlm compile`,
`jaxlm eval` and the benchmarks build their pretraining task here."""

from __future__ import annotations

import ml_collections

from jaxlm.train.distill import CachedDistill, Distill, SpanCorruptionDistill
from jaxlm.train.lm import CausalLM
from jaxlm.train.seq2seq import SpanCorruption


def task(cfg: ml_collections.ConfigDict, **kwargs) -> CausalLM:
    """The pretraining task of `cfg` (kwargs: CausalLM's tokenizer, num_devices)."""
    if cfg.objective.name == "span_corruption":
        if cfg.distill.teacher:
            return SpanCorruptionDistill(cfg, **kwargs)
        return SpanCorruption(cfg, **kwargs)
    if cfg.distill.cache:
        return CachedDistill(cfg, **kwargs)
    if cfg.distill.teacher:
        return Distill(cfg, **kwargs)
    return CausalLM(cfg, **kwargs)
