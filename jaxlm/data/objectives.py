"""The data side of the pretraining objectives other than causal LM: what a masked-LM row
and a span-corruption example are, as pure functions of tokens and a numpy Generator, and
the settings each takes from the config and the tokenizer (`resolve`).

masked_lm (BERT, RoBERTa): of a packed row's real, non-special tokens (`Tokenizer.special_ids`:
    never pad, BOS/[CLS], EOS/[SEP], mask, sentinels), round(n * objective.mask_rate) (at
    least one, as BERT's create_pretraining_data) are chosen uniformly for prediction; each
    becomes the mask id with probability 0.8, a uniformly drawn non-special id with 0.1, and
    stays with 0.1. The mask id is the tokenizer's ([MASK], <mask>), else model.vocab_size - 1,
    an id the tokenizer never emits.

span_corruption (T5, as t5/seqio's span_corruption): a document's text ids are cut into chunks
    of `tokens_length`, the raw length for which the corrupted inputs fill data.seq_len
    (`span_corruption_lengths`, seqio's random_spans_helper). Each chunk's noise mask is
    seqio's random_spans_noise_mask: round(length * noise_density) noise tokens (float32, as
    TensorFlow computes it; at least one, and one less than the length) in round(noise /
    mean_span_length) spans (at least one), the noise and the non-noise tokens each split
    into that many non-empty spans uniformly at random, alternating non-noise, noise, ...
    Inputs: the non-noise tokens, each noise span replaced by one sentinel, then EOS;
    targets: each sentinel followed by its noise span, then EOS. Sentinel k is the
    tokenizer's <extra_id_k>, else model.vocab_size - 1 - k (seqio's top of the vocabulary).

    Unlike T5's C4 task, documents are not first concatenated 128 at a time (nor is one
    random 65,536-token chunk of a long document kept): every chunk of every document is
    an example, the last one shorter, and the packer (jaxlm.data.seq2seq_packing) fills the
    rows with several.

Randomness comes from a Generator the caller seeds from (data.shuffle_seed, the row stream,
the row or chunk number), so the batch at step k is a function of (seed, k, config).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxlm.errors import ConfigError

# The mixing constants of the seeds (one per objective: the two never draw alike).
MASKED_LM_SEED_TAG = 0x4D4C4D  # "MLM"
SPAN_CORRUPTION_SEED_TAG = 0x5350414E  # "SPAN"

_KEEP, _RANDOM = 0.1, 0.1  # BERT's 80/10/10: of the selected, kept and randomly replaced
_CHECK_CHUNK = 1 << 20  # lengths checked at a time (bounded memory for long rows)


# ---- masked LM ------------------------------------------------------------------------------

def mask_tokens(tokens: np.ndarray, candidates: np.ndarray, rng: np.random.Generator,
                mask_rate: float, mask_id: int, random_ids: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one row: (corrupted inputs, selected positions as bool).

    Of the n positions where `candidates` is true, max(1, round(n * mask_rate)) (none when
    n = 0) are selected uniformly without replacement; each becomes `mask_id` with
    probability 0.8, `random_ids[uniform]` with 0.1, and is kept with 0.1."""
    where = np.flatnonzero(candidates)
    count = min(len(where), max(1, round(len(where) * mask_rate))) if len(where) else 0
    chosen = where[rng.permutation(len(where))[:count]]
    draw = rng.random(count)
    inputs = tokens.copy()
    inputs[chosen[draw < 1 - _KEEP - _RANDOM]] = mask_id
    replaced = chosen[draw >= 1 - _RANDOM]
    inputs[replaced] = random_ids[rng.integers(len(random_ids), size=len(replaced))]
    selected = np.zeros(len(tokens), bool)
    selected[chosen] = True
    return inputs, selected


@dataclasses.dataclass(frozen=True)
class MaskedLM:
    """objective.name = "masked_lm", resolved against a tokenizer."""

    mask_rate: float
    mask_id: int
    special_ids: np.ndarray  # never selected
    random_ids: np.ndarray  # the 10% random replacements are drawn from these

    name = "masked_lm"
    seed_tag = MASKED_LM_SEED_TAG

    def example(self, row: tuple[np.ndarray, np.ndarray, np.ndarray],
                rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A packed row (tokens, segment ids, positions) of data.seq_len -> inputs (corrupted),
        targets (the row), segment_ids, positions (int32) and weights (float32: 1 exactly at
        the selected positions)."""
        tokens, segments, positions = row
        candidates = (segments != 0) & ~np.isin(tokens, self.special_ids)
        inputs, selected = mask_tokens(tokens, candidates, rng, self.mask_rate, self.mask_id,
                                       self.random_ids)
        return {"inputs": inputs, "targets": tokens, "segment_ids": segments,
                "positions": positions, "weights": selected.astype(np.float32)}

    def padding(self, seq_len: int) -> dict[str, np.ndarray]:
        """The example of a row stream that has ended (finite splits)."""
        zeros = np.zeros(seq_len, np.int32)
        return {"inputs": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
                "weights": np.zeros(seq_len, np.float32)}

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "mask_rate": float(self.mask_rate),
                "mask_id": int(self.mask_id)}


def masked_lm(objective_cfg: Any, tokenizer: Any, model_vocab_size: int | None) -> MaskedLM:
    """The masked-LM settings of `objective_cfg` for `tokenizer`; ConfigError naming
    model.vocab_size when the tokenizer has no mask token and the model no id above it."""
    mask_id = tokenizer.mask_id
    if mask_id is None:
        if model_vocab_size is None or model_vocab_size <= tokenizer.vocab_size:
            raise ConfigError(
                f"config.model.vocab_size: objective.name='masked_lm' with a tokenizer that has "
                f"no mask token needs model.vocab_size > the tokenizer's {tokenizer.vocab_size} "
                f"ids (the mask is id model.vocab_size - 1), got {model_vocab_size}")
        mask_id = model_vocab_size - 1
    special = np.asarray(tokenizer.special_ids(), np.int32)
    random_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32), special)
    if not len(random_ids):
        raise ConfigError(f"config.data.tokenizer: objective.name='masked_lm' needs a tokenizer "
                          f"with ids that are not special; all {tokenizer.vocab_size} are")
    return MaskedLM(float(objective_cfg.mask_rate), int(mask_id),
                    np.union1d(special, [mask_id]).astype(np.int32), random_ids)


# ---- span corruption ------------------------------------------------------------------------

def _helper_lengths(tokens_length: int, noise_density: float, mean_span_length: float
                    ) -> tuple[int, int]:
    """seqio's (inputs, targets) lengths of a raw chunk, EOS included (Python floats)."""
    noise = round(tokens_length * noise_density)
    spans = round(noise / mean_span_length)
    return tokens_length - noise + spans + 1, noise + spans + 1


def span_corruption_lengths(seq_len: int, noise_density: float, mean_span_length: float
                            ) -> tuple[int, int]:
    """(tokens_length, targets_length), as seqio's random_spans_helper computes them for
    inputs of `seq_len` (one sentinel per span in inputs and in targets, EOS included):
    the longest raw chunk whose corrupted inputs fit `seq_len`, and its targets' length.
    The decoder length of objective.targets_len = 0, and what a set one must reach."""
    def inputs_len(n: int) -> int:
        return _helper_lengths(n, noise_density, mean_span_length)[0]
    # seqio counts up from seq_len - 1 while the next length still fits; the inputs length
    # never decreases with the chunk's, so the same answer comes from doubling and bisecting.
    fits, step = seq_len - 1, 1
    while inputs_len(fits + step) <= seq_len:
        fits, step = fits + step, step * 2
    too_long = fits + step
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        fits, too_long = (middle, too_long) if inputs_len(middle) <= seq_len else (fits, middle)
    tokens_length = fits
    inputs_length, targets_length = _helper_lengths(tokens_length, noise_density,
                                                    mean_span_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # seqio: equal lengths
        tokens_length, targets_length = tokens_length - 1, targets_length - 1
    return tokens_length, targets_length


def noise_counts(length: np.ndarray | int, noise_density: float, mean_span_length: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(noise tokens, noise spans) of random_spans_noise_mask for chunks of `length` >= 2,
    in float32 as TensorFlow computes them, with seqio's bounds."""
    length = np.asarray(length, np.int64)
    noise = np.round(length.astype(np.float32) * np.float32(noise_density)).astype(np.int64)
    noise = np.minimum(np.maximum(noise, 1), length - 1)
    spans = np.round(noise.astype(np.float32) / np.float32(mean_span_length)).astype(np.int64)
    return noise, np.maximum(spans, 1)


def _random_segmentation(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `segments` non-empty runs that `items` items are cut into, uniformly."""
    first_in_segment = np.zeros(items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(items - 1) < segments - 1)
    return np.bincount(np.cumsum(first_in_segment), minlength=segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """seqio's random_spans_noise_mask (without random_roll) of a chunk of `length` tokens:
    bool, True at noise; non-noise first. A chunk of 1 is cut from the mask of 2 (no noise)."""
    padded = max(length, 2)
    noise, spans = (int(x) for x in noise_counts(padded, noise_density, mean_span_length))
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(padded - noise, spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_number = np.repeat(np.arange(2 * spans), interleaved)
    return (span_number % 2 == 1)[:length]


def corrupt_spans(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos_id: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), int32: inputs keep the non-noise tokens and put sentinels[k] for
    the k-th noise span; targets keep the noise tokens and put sentinels[k] for the k-th
    non-noise span; each ends with `eos_id` (seqio's noise_span_to_unique_sentinel and
    nonnoise_span_to_unique_sentinel, then EOS)."""
    def replace_runs(marked: np.ndarray) -> np.ndarray:
        previous = np.concatenate([[False], marked[:-1]])
        first = marked & ~previous
        out = np.where(first, sentinels[np.maximum(np.cumsum(first) - 1, 0)], tokens)
        return np.concatenate([out[~(marked & previous)], [eos_id]]).astype(np.int32)
    return replace_runs(noise), replace_runs(~noise)


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """objective.name = "span_corruption", resolved against data.seq_len and a tokenizer."""

    noise_density: float
    mean_span_length: float
    tokens_length: int  # a chunk of a document (seqio's raw length)
    inputs_len: int  # the encoder row: data.seq_len
    targets_len: int  # the decoder row
    sentinels: np.ndarray  # sentinels[k]: the id of span k's sentinel
    eos_id: int
    decoder_start_id: int

    name = "span_corruption"
    seed_tag = SPAN_CORRUPTION_SEED_TAG

    def example(self, chunk: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of a chunk of at most `tokens_length` text ids."""
        noise = random_spans_noise_mask(len(chunk), self.noise_density, self.mean_span_length,
                                        rng)
        return corrupt_spans(chunk, noise, self.sentinels, self.eos_id)

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "noise_density": float(self.noise_density),
                "mean_span_length": float(self.mean_span_length),
                "targets_len": int(self.targets_len), "eos_id": int(self.eos_id),
                "decoder_start_id": int(self.decoder_start_id),
                "sentinels": [int(i) for i in self.sentinels]}


def realized_lengths(tokens_length: int, noise_density: float, mean_span_length: float
                     ) -> tuple[int, int, int]:
    """The longest inputs, the longest targets (EOS included) and the most spans of any
    chunk of 1 ... `tokens_length` tokens, as the noise mask makes them. They can pass
    seqio's formula for short chunks (its at-least-one-span bound) and when noise spans
    outnumber the non-noise tokens (the mask then cannot alternate)."""
    longest_inputs = longest_targets = 2  # a chunk of 1: [token, EOS] and [s0, EOS]
    most_spans = 1
    for start in range(2, tokens_length + 1, _CHECK_CHUNK):
        length = np.arange(start, min(start + _CHECK_CHUNK, tokens_length + 1), dtype=np.int64)
        noise, spans = noise_counts(length, noise_density, mean_span_length)
        if (spans > length - noise).any():
            raise ConfigError(
                f"config.objective: noise_density={noise_density} with mean_span_length="
                f"{mean_span_length} makes more noise spans than non-noise tokens, which "
                f"span corruption alternates with: lower noise_density or raise "
                f"mean_span_length")
        longest_inputs = max(longest_inputs, int((length - noise + spans + 1).max()))
        longest_targets = max(longest_targets, int((noise + spans + 1).max()))
        most_spans = max(most_spans, int(spans.max()))
    return longest_inputs, longest_targets, most_spans


def check_span_corruption(objective_cfg: Any, seq_len: int) -> tuple[int, int, int]:
    """(tokens_length, targets_len, most spans of a chunk) of span corruption for inputs of
    `seq_len`: what config validation can check before any tokenizer is read. ConfigError
    naming objective.targets_len when it is set below the derived length, data.seq_len when
    a chunk's inputs or targets would not fit (a short row), config.objective when the noise
    spans would outnumber the non-noise tokens."""
    density, span = float(objective_cfg.noise_density), float(objective_cfg.mean_span_length)
    tokens_length, needed = span_corruption_lengths(seq_len, density, span)
    targets_len = int(objective_cfg.targets_len) or needed
    if targets_len < needed:
        raise ConfigError(
            f"config.objective.targets_len: {targets_len} is shorter than the {needed} targets "
            f"tokens span corruption makes of data.seq_len={seq_len} inputs at noise_density="
            f"{density}, mean_span_length={span}; set it to 0 (derived) or >= {needed}")
    longest_inputs, longest_targets, spans = realized_lengths(tokens_length, density, span)
    if longest_inputs > seq_len or longest_targets > targets_len:
        raise ConfigError(
            f"config.data.seq_len: {seq_len} is too short for span corruption at noise_density="
            f"{density}, mean_span_length={span}: a chunk's inputs reach {longest_inputs} "
            f"tokens (max {seq_len}) and its targets {longest_targets} (max {targets_len})")
    return tokens_length, targets_len, spans


def span_corruption(objective_cfg: Any, seq_len: int, tokenizer: Any,
                    model_vocab_size: int | None) -> SpanCorruption:
    """The span-corruption settings of `objective_cfg` for inputs of `seq_len` and
    `tokenizer`; ConfigError naming the key when data.seq_len, objective.targets_len, the
    tokenizer's EOS or sentinels, or model.vocab_size cannot serve them."""
    tokens_length, targets_len, spans = check_span_corruption(objective_cfg, seq_len)
    if tokenizer.eos_id is None:
        raise ConfigError("config.data.tokenizer: objective.name='span_corruption' needs a "
                          "tokenizer with an EOS token (inputs and targets end with it)")
    if tokenizer.sentinels:
        if len(tokenizer.sentinels) < spans:
            raise ConfigError(
                f"config.data.seq_len: span corruption of {seq_len}-token inputs makes up to "
                f"{spans} noise spans, the tokenizer has {len(tokenizer.sentinels)} sentinels "
                f"(<extra_id_N>): lower data.seq_len or objective.noise_density, or raise "
                f"objective.mean_span_length")
        sentinels = np.asarray(tokenizer.sentinel_ids(spans), np.int32)
    else:
        if model_vocab_size is None or model_vocab_size - spans < tokenizer.vocab_size:
            raise ConfigError(
                f"config.model.vocab_size: objective.name='span_corruption' with a tokenizer "
                f"without sentinels takes the {spans} ids below model.vocab_size as sentinels; "
                f"they must lie above the tokenizer's {tokenizer.vocab_size} ids: need "
                f"model.vocab_size >= {tokenizer.vocab_size + spans}, got {model_vocab_size}")
        sentinels = model_vocab_size - 1 - np.arange(spans, dtype=np.int32)
    return SpanCorruption(float(objective_cfg.noise_density),
                          float(objective_cfg.mean_span_length), tokens_length, seq_len,
                          targets_len, sentinels, int(tokenizer.eos_id),
                          int(tokenizer.decoder_start_id))


def resolve(objective_cfg: Any, seq_len: int, tokenizer: Any, model_vocab_size: int | None
            ) -> MaskedLM | SpanCorruption | None:
    """The settings of the objective `objective_cfg` names; None for causal LM (or no
    objective section)."""
    name = "causal_lm" if objective_cfg is None else objective_cfg.name
    if name == "causal_lm":
        return None
    if name == "masked_lm":
        return masked_lm(objective_cfg, tokenizer, model_vocab_size)
    if name == "span_corruption":
        return span_corruption(objective_cfg, seq_len, tokenizer, model_vocab_size)
    raise ConfigError(f"config.objective.name: unknown objective {name!r}; available: "
                      f"causal_lm, masked_lm, span_corruption")
