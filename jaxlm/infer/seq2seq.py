"""Sequence-to-sequence generation for the encoder-decoder families (zoo kind
"encoder_decoder": t5): input ids -> output ids, greedy, sampled or by beam search.

    gen = Seq2SeqGenerator(cfg.model, params, mesh)     # or: gen, tok, cfg = load(workdir)
    outs = gen.generate([[37, 8, 1], [5, 1]], max_new_tokens=32, decoder_start_id=0,
                        stop_tokens=[1], beam=Beam(4, length_penalty=0.6))

The inputs of a batch are right-padded to a common length (a multiple of `input_bucket`,
so nearby lengths share one compilation; padding has encoder segment id 0 and is never
attended) and the batch to a multiple of the mesh's batch shards; relative positions put
no limit on their length. One jitted call per
batch: the encoder runs once, the decoder starts from `decoder_start_id` (T5: the pad id 0)
and decodes one token per step with the model's cache (`model.init_cache`,
`model.decode_step`) inside a `lax.while_loop` that ends once every row has stopped; no
host round trip per token. The generator keeps the decoder's layers apart (the network
module's `unstack_decoder`, done once when it is built, in place of the stacked arrays: no
second copy) and passes them to `init_cache` and `decode_step` as `layers`, so that no
token slices the layers' weights out of the stacked arrays (on CPU, copies that cost
about twice the step's matmuls); `params` stacks them again.

Greedy and sampling use jaxlm.infer.generate's `Sampling` and `sample` (temperature, then
top-k, then top-p; token t, from 0, drawn with key fold_in(seed key, t)). Beam search is
jaxlm.infer.beam: transformers' algorithm, the cache rows of the beams reordered every step
with the network module's `select_rows(cache, rows)`. Outputs are the generated ids after
the decoder start, ending with the stop token that ended them if one did.
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxlm.checkpoint import rundir
from jaxlm.errors import ConfigError
from jaxlm.infer import run_params
from jaxlm.infer.beam import Beam, search
from jaxlm.infer.generate import GenerationError, Sampling, check_prompts, sample
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules

ENCODER_DECODER = "encoder_decoder"


# ---- the device functions (any model with encode / init_cache / decode_step) ---------------

# `layers`: the decoder's layers apart (the network module's unstack_decoder), passed on to
# the model's init_cache and decode_step; None: the model's own (stacked) parameters.
def _with_layers(layers: Any) -> dict[str, Any]:
    return {} if layers is None else {"layers": layers}


def encode(model: Any, tokens_BxS: jax.Array, segments_BxS: jax.Array, max_new_tokens: int,
           start_id: jax.Array, layers: Any = None) -> tuple[Any, jax.Array]:
    """(the decoder cache of max_new_tokens slots over the encoded inputs, int32 decoder
    start tokens B)."""
    enc_BxSxD = model.encode(tokens_BxS, None, segments_BxS)
    cache = model.init_cache(enc_BxSxD, segments_BxS, max_new_tokens, **_with_layers(layers))
    return cache, jnp.full(tokens_BxS.shape[:1], start_id, jnp.int32)


def sampled(model: Any, tokens_BxS: jax.Array, segments_BxS: jax.Array, start_id: jax.Array,
            stop_ids: jax.Array, key: jax.Array, *, max_new_tokens: int,
            sampling: Sampling, layers: Any = None) -> tuple[jax.Array, jax.Array]:
    """Greedy or sampled decoding: (int32 tokens B x max_new_tokens, 0 after a row's stop;
    int32 lengths B, the stop token included)."""
    cache, token_B = encode(model, tokens_BxS, segments_BxS, max_new_tokens, start_id, layers)
    rows = tokens_BxS.shape[0]

    def step(carry):
        i, cache, token_B, done_B, length_B, out_BxL = carry
        logits_Bx1xV, cache = model.decode_step(token_B[:, None], cache, **_with_layers(layers))
        token_B = jnp.where(done_B, 0, sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, i),
                                              sampling))
        length_B = jnp.where(done_B, length_B, i + 1)
        done_B = done_B | jnp.isin(token_B, stop_ids)
        return i + 1, cache, token_B, done_B, length_B, out_BxL.at[:, i].set(token_B)

    def going(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[3])

    start = (jnp.int32(0), cache, token_B, jnp.zeros(rows, bool), jnp.zeros(rows, jnp.int32),
             jnp.zeros((rows, max_new_tokens), jnp.int32))
    out = jax.lax.while_loop(going, step, start)
    return out[5], out[4]


def beam_searched(model: Any, select_rows: Callable[[Any, jax.Array], Any],
                  tokens_BxS: jax.Array, segments_BxS: jax.Array, start_id: jax.Array,
                  stop_ids: jax.Array, scoring: dict[str, jax.Array], *, max_new_tokens: int,
                  num_beams: int, n_stop_ids: int, layers: Any = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Beam search (jaxlm.infer.beam.search; `scoring`: Beam.scoring()) over each input's
    encoding repeated num_beams times: (tokens B x max_new_tokens, lengths B, scores B)."""
    nb = num_beams
    tokens_RxS = jnp.repeat(tokens_BxS, nb, axis=0)
    segments_RxS = jnp.repeat(segments_BxS, nb, axis=0)
    cache, start_R = encode(model, tokens_RxS, segments_RxS, max_new_tokens, start_id, layers)

    def step(token_R, cache):
        logits_Rx1xV, cache = model.decode_step(token_R[:, None], cache, **_with_layers(layers))
        return logits_Rx1xV[:, 0], cache

    return search(step, select_rows, cache, start_R, stop_ids, scoring, num_beams=nb,
                  batch=tokens_BxS.shape[0], max_new_tokens=max_new_tokens,
                  n_stop_ids=n_stop_ids)


# ---- inputs --------------------------------------------------------------------------------

def check_inputs(inputs: Sequence[Sequence[int]], max_new_tokens: int,
                 vocab_size: int) -> list[np.ndarray]:
    """The encoder inputs as int32 arrays (generate.check_prompts, with no length limit:
    the encoder reads any length its position buckets cover)."""
    return check_prompts(inputs, max_new_tokens, vocab_size, None, what="input")


def check_request(inputs: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                  decoder_start_id: int, stop_tokens: Sequence[int] = (),
                  sampling: Sampling = Sampling(), beam: Beam | None = None
                  ) -> list[np.ndarray]:
    """check_inputs, and the settings: GenerationError naming a decoder start or stop id
    outside the vocabulary, beam search with sampling, or more beam candidates per step
    than the vocabulary has ids. Nothing compiles before this passes."""
    arrays = check_inputs(inputs, max_new_tokens, vocab_size)
    for what, ids in (("decoder_start_id", [decoder_start_id]), ("stop token", stop_tokens)):
        for i in ids:
            if isinstance(i, bool) or int(i) != i or not 0 <= i < vocab_size:
                raise GenerationError(f"{what} {i!r} is not an id of the model's vocabulary "
                                      f"[0, {vocab_size})")
    if beam is not None and beam.num_beams > 1:
        if not sampling.greedy:
            raise GenerationError("beam search is deterministic: sampling (temperature > 0) "
                                  "needs num_beams 1")
        candidates = beam.candidates(len(set(stop_tokens)))
        if candidates > vocab_size:
            raise GenerationError(f"num_beams={beam.num_beams} keeps {candidates} candidates "
                                  f"per step, more than the {vocab_size} ids of the vocabulary")
    return arrays


def pad_inputs(arrays: list[np.ndarray], bucket: int, shards: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment ids) B' x S: the inputs right-padded to a multiple of `bucket`
    (pad id 0, segment 0) and the rows to a multiple of `shards` (copies of row 0)."""
    length = -(-max(a.size for a in arrays) // bucket) * bucket
    rows = -(-len(arrays) // shards) * shards
    arrays = arrays + [arrays[0]] * (rows - len(arrays))
    tokens = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    for i, a in enumerate(arrays):
        tokens[i, :a.size] = a
        segments[i, :a.size] = 1
    return tokens, segments


def network_module(model_cfg: ml_collections.ConfigDict) -> Any:
    """The family's network module: its `select_rows(cache, rows)`, which beam search
    reorders with, and `unstack_decoder(params)` / `restack_decoder(rest, layers)`."""
    return importlib.import_module(zoo.family(model_cfg.family).network.split(":")[0])


# ---- the generator -------------------------------------------------------------------------

class Seq2SeqGenerator:
    """An encoder-decoder's parameters placed on a mesh, and its jitted generation."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, params: Any,
                 mesh: jax.sharding.Mesh | None = None, input_bucket: int = 16):
        kind = zoo.family(model_cfg.family).kind
        if kind != ENCODER_DECODER:
            raise GenerationError(
                f"model family {model_cfg.family!r} is an {kind} model: sequence-to-sequence "
                f"generation needs an encoder-decoder (family t5)")
        self.cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        self.mesh = mesh if mesh is not None else mesh_lib.single_device_mesh()
        self.input_bucket = max(int(input_bucket), 1)
        self.graphdef, abstract_state = nnx.split(zoo.abstract(self.cfg))
        network = network_module(self.cfg)
        self._select_rows, self._restack = network.select_rows, network.restack_decoder
        # What the generator keeps: the parameters without the stacked decoder, and the
        # decoder's layers apart (module docstring).
        self._rest, self._layers = network.unstack_decoder(
            jax.device_put(params, rules.shardings_of(abstract_state, self.mesh)))
        self._batch_sharding = rules.batch_sharding(self.mesh)
        self._sampled = jax.jit(self._sampled_fn, static_argnames=("max_new_tokens", "sampling"))
        self._beams = jax.jit(self._beams_fn,
                              static_argnames=("max_new_tokens", "num_beams", "n_stop_ids"))

    @property
    def params(self) -> Any:
        """The parameter tree (nested dict), the decoder's layers stacked again (a copy)."""
        return self._restack(self._rest, self._layers)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def _merged(self, rest, layers) -> nnx.Module:
        # Generation reads only `layers`: XLA drops the stacking of the unread copy.
        return nnx.merge(self.graphdef, self._restack(rest, layers))

    def _sampled_fn(self, rest, layers, tokens_BxS, segments_BxS, start_id, stop_ids, key, *,
                    max_new_tokens, sampling):
        return sampled(self._merged(rest, layers), tokens_BxS, segments_BxS, start_id,
                       stop_ids, key, max_new_tokens=max_new_tokens, sampling=sampling,
                       layers=layers)

    def _beams_fn(self, rest, layers, tokens_BxS, segments_BxS, start_id, stop_ids, scoring, *,
                  max_new_tokens, num_beams, n_stop_ids):
        return beam_searched(self._merged(rest, layers), self._select_rows, tokens_BxS,
                             segments_BxS, start_id, stop_ids, scoring,
                             max_new_tokens=max_new_tokens, num_beams=num_beams,
                             n_stop_ids=n_stop_ids, layers=layers)

    def generate(self, inputs: Sequence[Sequence[int]], max_new_tokens: int, *,
                 decoder_start_id: int, stop_tokens: Sequence[int] = (),
                 sampling: Sampling = Sampling(), seed: int = 0,
                 beam: Beam | None = None) -> list[np.ndarray]:
        """Each input's output ids (int32), ending with the stop token if one came. `beam`
        with num_beams > 1: beam search (deterministic: `sampling` must be greedy);
        otherwise greedy or sampled decoding."""
        arrays = check_request(inputs, max_new_tokens, self.cfg.vocab_size,
                               decoder_start_id, stop_tokens, sampling, beam)
        tokens, segments = pad_inputs(arrays, self.input_bucket, mesh_lib.batch_shards(self.mesh))
        stop = sorted({int(s) for s in stop_tokens})
        stop_ids = jnp.asarray(stop or [-1], jnp.int32)
        start_id = jnp.int32(decoder_start_id)
        with mesh_lib.use(self.mesh):
            tokens = jax.device_put(tokens, self._batch_sharding)
            segments = jax.device_put(segments, self._batch_sharding)
            params = (self._rest, self._layers)
            if beam is not None and beam.num_beams > 1:
                out_BxL, length_B, _ = self._beams(
                    *params, tokens, segments, start_id, stop_ids, beam.scoring(),
                    max_new_tokens=int(max_new_tokens), num_beams=beam.num_beams,
                    n_stop_ids=len(stop))
            else:
                out_BxL, length_B = self._sampled(
                    *params, tokens, segments, start_id, stop_ids, jax.random.key(seed),
                    max_new_tokens=int(max_new_tokens), sampling=sampling)
        out_BxL, length_B = jax.device_get((out_BxL, length_B))
        return [out_BxL[i, :length_B[i]].astype(np.int32) for i in range(len(arrays))]


# ---- loading a run -------------------------------------------------------------------------

def load(workdir: str | pathlib.Path, cfg: ml_collections.ConfigDict | None = None,
         input_bucket: int = 16):
    """(Seq2SeqGenerator, tokenizer, config) of an encoder-decoder run: the newest
    checkpoint's parameters (see run_params), its saved config (or `cfg`) and
    WORKDIR/tokenizer."""
    saved, step_dir = rundir.saved_config(workdir)
    cfg = mesh_lib.fit_mesh(cfg if cfg is not None else saved)
    tokenizer = rundir.load_tokenizer(workdir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids ({rundir.locate(workdir).workdir / 'tokenizer'})")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    params = run_params.restore(cfg, step_dir, mesh)
    return Seq2SeqGenerator(cfg.model, params, mesh, input_bucket), tokenizer, cfg


def default_decoder_start_id(tokenizer, step_dir: str | pathlib.Path) -> int:
    """The id the decoder starts from: a model converted from Hugging Face, the
    decoder_start_token_id its config named (in the checkpoint's metadata); otherwise the
    tokenizer's (`decoder_start_id`: the pad id, as span-corruption pretraining used)."""
    meta = rundir.read_metadata(step_dir)
    recorded = (meta.get("hf_source") or {}).get("decoder_start_token_ids") or []
    return int(recorded[0]) if recorded else int(tokenizer.decoder_start_id)


def encode_input(tokenizer, text: str) -> np.ndarray:
    """An encoder input as the pipeline tokenizes a document: the tokenizer's start
    (`start_ids()`, [BOS] when it `adds_bos`; T5's has none) + ids + EOS."""
    return tokenizer.document(tokenizer.encode(text))
