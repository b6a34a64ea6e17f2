"""Text generation: prefill and decode under jit with a preallocated KV cache, and sampling.

    gen = Generator(cfg.model, params, mesh)            # or: gen, tok, cfg = load(workdir)
    outs = gen.generate([[1, 72, 105], [1, 66]], max_new_tokens=32,
                        sampling=Sampling(temperature=0.8, top_p=0.95), stop_tokens=[2])

Prompts of different lengths are left-padded to a common length (a multiple of
`prompt_bucket`, so nearby lengths share one compilation) and the batch is padded to a
multiple of the mesh's batch shards; positions and masks make each row compute exactly
what it would alone (see jaxlm/model/kv_cache.py). The cache holds prompt + max_new_tokens
slots. A prompt that does not fit the model's positions (model.max_seq_len) together with
max_new_tokens is an error before anything compiles; nothing is truncated.

The prefill is one jitted call; then each jitted call decodes a block of up to `block`
tokens (a `lax.while_loop` over one-token steps, the cache donated and updated in place),
ending early once every row has stopped; the host reads a block's tokens while the next
block runs, and streams them token by token. A block computes exactly the tokens of
one-token calls (the same steps; token t is sampled with key fold_in(seed key, t)); it only
saves the per-token dispatch and host round trip, which at batch 1 on a CPU cost as much
as the step itself. Sampling order (as Hugging Face): temperature, then top-k, then top-p;
temperature 0 is greedy (argmax). Outputs include the stop token that ended a row.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxlm.checkpoint import rundir
from jaxlm.config.schema import KV_CACHE_DTYPES
from jaxlm.errors import ConfigError, UserError
from jaxlm.infer import run_params
from jaxlm.model import kv_cache, zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules


class GenerationError(UserError, ValueError):
    """Bad generation input (a prompt, a sampling setting); the message names it."""


# ---- sampling ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep only the k most likely tokens (ties at the k-th value kept); 0: off
    top_p: float = 1.0  # keep the fewest most likely tokens whose probability reaches p; 1: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_BxV: jax.Array, sampling: Sampling) -> jax.Array:
    """float32 logits / temperature with the tokens top-k and top-p remove set to -inf."""
    logits = logits_BxV.astype(jnp.float32)
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_Bx1 = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_Bx1, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        kept = jnp.sum(mass_before_BxV < sampling.top_p, axis=-1, keepdims=True)  # >= 1
        threshold_Bx1 = jnp.take_along_axis(sorted_BxV, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold_Bx1, -jnp.inf, logits)
    return logits


def sample(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 next tokens of each row."""
    if sampling.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_BxV, sampling)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


# ---- the generator -----------------------------------------------------------------------

def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                  max_seq_len: int | None, what: str = "prompt") -> list[np.ndarray]:
    """The prompts as int32 arrays; GenerationError naming the first prompt that is empty,
    holds an id outside the vocabulary, or does not fit max_seq_len with max_new_tokens
    (None: no limit, as for an encoder's inputs). `what` names them in errors ("input")."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise GenerationError(f"no {what}s given")
    arrays = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise GenerationError(f"{what} {i}: expected a non-empty list of token ids, "
                                  f"got shape {ids.shape} of {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise GenerationError(f"{what} {i}: token id {int(bad[0])} is outside the "
                                  f"model's vocabulary [0, {vocab_size})")
        if max_seq_len is not None and ids.size + max_new_tokens > max_seq_len:
            raise GenerationError(
                f"prompt {i} has {ids.size} tokens; with max_new_tokens={max_new_tokens} "
                f"generation needs {ids.size + max_new_tokens} positions, more than the "
                f"model's {max_seq_len} (model.max_seq_len): shorten the prompt or lower "
                f"max_new_tokens (nothing is truncated)")
        arrays.append(ids.astype(np.int32))
    return arrays


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise GenerationError(f"config.generate.kv_cache_dtype: {kv_cache_dtype!r} not in "
                              f"{KV_CACHE_DTYPES}")


@dataclasses.dataclass(frozen=True)
class _Batch:
    tokens_BxP: np.ndarray  # left-padded prompts (pad id 0: masked, never attended)
    start_B: np.ndarray  # first real slot of each row
    rows: int  # real rows; the rest copy row 0 to fill the batch shards
    cache_len: int


class Generator:
    """A model's parameters placed on a mesh, and its jitted prefill and decode step."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, params: Any,
                 mesh: jax.sharding.Mesh | None = None, prompt_bucket: int = 16,
                 block: int = 16, kv_cache_dtype: str = "model"):
        """`kv_cache_dtype`: config generate.kv_cache_dtype ("model" or "int8")."""
        check_kv_cache_dtype(kv_cache_dtype)
        self.cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        self.kv_cache_dtype = kv_cache_dtype
        self.mesh = mesh if mesh is not None else mesh_lib.single_device_mesh()
        self.prompt_bucket = max(int(prompt_bucket), 1)
        self.block = max(int(block), 1)  # new tokens per device call (1: a call per token)
        self.graphdef, abstract_state = nnx.split(zoo.abstract(self.cfg))
        self._param_shardings = rules.shardings_of(abstract_state, self.mesh)
        self.place(params)
        self._batch_sharding = rules.batch_sharding(self.mesh)
        self._row_sharding = jax.sharding.NamedSharding(
            self.mesh, rules.logical_to_spec(("batch",)))
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("sampling", "cache_len"))
        self._decode = jax.jit(self._decode_fn, static_argnames=("sampling", "with_logits"),
                               donate_argnums=(1,))

    def place(self, params: Any) -> None:
        """New parameters of the same model, placed as the first (nothing recompiles)."""
        self.params = jax.device_put(params, self._param_shardings)

    @property
    def model(self) -> nnx.Module:
        """The model as an nnx module (for evaluate.score and other forward passes)."""
        return nnx.merge(self.graphdef, self.params)

    # -- jitted functions --
    def _prefill_fn(self, params, tokens_BxP, start_B, key, stop_ids, *, sampling, cache_len):
        model = nnx.merge(self.graphdef, params)
        cache = kv_cache.init_cache(self.cfg, start_B, cache_len, self.kv_cache_dtype)
        logits_Bx1xV, cache = model(tokens_BxP, kv_cache.positions(cache, tokens_BxP.shape[1]),
                                    cache=cache)
        token_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, 0), sampling)
        return cache, token_B, jnp.isin(token_B, stop_ids), logits_Bx1xV[:, 0]

    def _decode_fn(self, params, cache, token_B, done_B, key, t0, end, stop_ids, *,
                   sampling, with_logits):
        """A block: the tokens after `token_B` sampled with keys t0, t0 + 1, ... (one model
        step each), at most self.block of them and none with a key >= `end`, stopping early
        once every row is done. Returns (cache, last token B, last done B, tokens B x block,
        done B x block, logits B x block x V or None, steps taken, the next block's t0)."""
        model = nnx.merge(self.graphdef, params)
        rows, n = token_B.shape[0], self.block

        def step(carry):
            i, cache, token_B, done_B, tokens_BxN, done_BxN, logits_BxNxV = carry
            logits_Bx1xV, cache = model(token_B[:, None], kv_cache.positions(cache, 1),
                                        cache=cache)
            token_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, t0 + i), sampling)
            done_B = done_B | jnp.isin(token_B, stop_ids)
            tokens_BxN = tokens_BxN.at[:, i].set(token_B)
            done_BxN = done_BxN.at[:, i].set(done_B)
            if with_logits:
                logits_BxNxV = logits_BxNxV.at[:, i].set(logits_Bx1xV[:, 0].astype(jnp.float32))
            return i + 1, cache, token_B, done_B, tokens_BxN, done_BxN, logits_BxNxV

        def going(carry):
            i, done_B = carry[0], carry[3]
            return (i < n) & (t0 + i < end) & ~jnp.all(done_B)

        start = (jnp.int32(0), cache, token_B, done_B, jnp.zeros((rows, n), jnp.int32),
                 jnp.ones((rows, n), bool),
                 jnp.zeros((rows, n, self.cfg.vocab_size), jnp.float32) if with_logits else None)
        taken, cache, token_B, done_B, tokens_BxN, done_BxN, logits_BxNxV = \
            jax.lax.while_loop(going, step, start)
        return cache, token_B, done_B, tokens_BxN, done_BxN, logits_BxNxV, taken, t0 + taken

    # -- host side --
    def _prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> _Batch:
        """Checks every prompt and pads the batch; raises GenerationError naming the prompt."""
        arrays = check_prompts(prompts, max_new_tokens, self.cfg.vocab_size,
                               self.cfg.max_seq_len)
        longest = max(a.size for a in arrays)
        length = -(-longest // self.prompt_bucket) * self.prompt_bucket
        shards = mesh_lib.batch_shards(self.mesh)
        rows = len(arrays)
        padded_rows = -(-rows // shards) * shards
        arrays += [arrays[0]] * (padded_rows - rows)
        tokens = np.zeros((padded_rows, length), np.int32)
        start = np.zeros(padded_rows, np.int32)
        for i, a in enumerate(arrays):
            start[i] = length - a.size
            tokens[i, start[i]:] = a
        return _Batch(tokens, start, rows, length + max_new_tokens)

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
               seed: int = 0, logits: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
        """Yields, per new token, (tokens_B, live_B): each prompt's next token and whether it
        belongs to the output (False once the row has emitted a stop token). With `logits`,
        also the float32 logits B x V the token was chosen from. Stops when every row has
        stopped or after max_new_tokens."""
        batch = self._prepare(prompts, max_new_tokens)
        rows = batch.rows
        stop_ids = jnp.asarray(sorted({int(s) for s in stop_tokens}) or [-1], jnp.int32)
        key = jax.random.key(seed)
        with mesh_lib.use(self.mesh):
            tokens = jax.device_put(batch.tokens_BxP, self._batch_sharding)
            start = jax.device_put(batch.start_B, self._row_sharding)
            out = self._prefill(self.params, tokens, start, key, stop_ids, sampling=sampling,
                                cache_len=batch.cache_len)
        # Token j (1-based) is sampled with key fold_in(key, j - 1): the prefill's is token 1.
        cache, token_B, done_B, logits_BxV = out
        pending = (token_B[:, None], done_B[:, None], 1) + (
            (logits_BxV[:, None],) if logits else ())
        t0, end = np.int32(1), np.int32(max_new_tokens)
        reach = 1  # the blocks dispatched so far cover keys below this (at most)
        finished = np.zeros(rows, bool)
        while True:
            following = None
            if reach < max_new_tokens:  # dispatch the next block before reading this one
                with mesh_lib.use(self.mesh):
                    cache, token_B, done_B, tokens_BxN, done_BxN, logits_BxNxV, taken, t0 = \
                        self._decode(self.params, cache, token_B, done_B, key, t0, end,
                                     stop_ids, sampling=sampling, with_logits=logits)
                following = (tokens_BxN, done_BxN, taken) + ((logits_BxNxV,) if logits else ())
                reach += self.block
            host = jax.device_get(pending)
            for i in range(int(host[2])):
                yield (host[0][:rows, i], ~finished) + ((host[3][:rows, i],) if logits else ())
                finished = finished | host[1][:rows, i]
                if finished.all():
                    return
            if following is None or int(host[2]) == 0:
                return
            pending = following

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
                 seed: int = 0) -> list[np.ndarray]:
        """The new tokens of each prompt (int32), ending with the stop token if one came."""
        outs: list[list[int]] = [[] for _ in prompts]
        for tokens_B, live_B in self.stream(prompts, max_new_tokens, sampling, stop_tokens, seed):
            for i in np.nonzero(live_B)[0]:
                outs[i].append(int(tokens_B[i]))
        return [np.asarray(o, np.int32) for o in outs]


# ---- loading a run -----------------------------------------------------------------------

def load(workdir: str | pathlib.Path, cfg: ml_collections.ConfigDict | None = None,
         prompt_bucket: int = 16):
    """(Generator, tokenizer, config) of a run: the newest checkpoint's parameters (a LoRA
    run's: its base with the adapters merged in memory, see run_params), the config saved
    with it (or `cfg`, e.g. with overrides applied) and WORKDIR/tokenizer."""
    saved, step_dir = rundir.saved_config(workdir)
    cfg = mesh_lib.fit_mesh(cfg if cfg is not None else saved)
    tokenizer = rundir.load_tokenizer(workdir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids ({rundir.locate(workdir).workdir / 'tokenizer'})")
    check_kv_cache_dtype(cfg.generate.kv_cache_dtype)  # before the parameters are read
    mesh = mesh_lib.make_mesh(cfg.mesh)
    params = run_params.restore(cfg, step_dir, mesh)
    return (Generator(run_params.model_config(cfg, step_dir), params, mesh, prompt_bucket,
                      kv_cache_dtype=cfg.generate.kv_cache_dtype), tokenizer, cfg)


def default_stop_ids(tokenizer, step_dir: str | pathlib.Path) -> list[int]:
    """The tokenizer's EOS and, for a model converted from Hugging Face, every eos id its
    config named (Llama 3 has several), from the checkpoint's metadata."""
    return stop_ids_of(tokenizer, rundir.read_metadata(step_dir))


def stop_ids_of(tokenizer, metadata: dict[str, Any]) -> list[int]:
    """default_stop_ids from a checkpoint's metadata (or what a run will record)."""
    stop = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    stop.update(int(i) for i in (metadata.get("hf_source") or {}).get("eos_token_ids", []))
    return sorted(stop)


def encode_prompt(tokenizer, text: str) -> np.ndarray:
    """A prompt as the pipeline tokenizes a document's start: the tokenizer's start
    (`start_ids()`: [BOS] when it `adds_bos`) + ids, no EOS."""
    ids = tokenizer.encode(text)
    return np.concatenate([tokenizer.start_ids(), ids]).astype(np.int32)


def stream_text(tokenizer, token_ids: Iterator[int], prefix_ids: Sequence[int] = ()
                ) -> Iterator[str]:
    """Text pieces as tokens arrive: what decoding prefix + tokens so far adds to the text
    already shown (decoding new tokens after the prompt keeps the tokenizer's spacing). A
    piece is held back while the text ends in an incomplete UTF-8 sequence (decoded as
    U+FFFD), so multi-byte characters print whole. Should a longer decode change earlier
    text, the pieces continue after the part both agree on."""
    ids = [int(t) for t in prefix_ids]
    shown = text = tokenizer.decode(ids)
    for token in token_ids:
        ids.append(int(token))
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        piece = text[len(os.path.commonprefix([shown, text])):]
        if piece:
            yield piece
            shown = text
    piece = text[len(os.path.commonprefix([shown, text])):]  # a held-back U+FFFD at the end
    if piece:
        yield piece
