"""Sequence-to-sequence generation (jaxlm.infer.seq2seq, jaxlm.infer.beam).

A stand-in encoder-decoder (tiny random recurrent decoder with the T5 generation API)
checks the search itself against float64 NumPy: beam search with enough beams and
early_stopping="never" finds the exact best complete sequence found by enumerating every
sequence; greedy equals the argmax chain. Then tiny random transformers T5 models (v1.0 ReLU
tied, v1.1 gated-GELU untied) converted by `jaxlm convert from-hf` and generated from on 8
simulated devices: greedy and beam search (3-4 beams, length penalties 0.6 / 1 / 2, early
stopping true / false / "never") equal transformers' `generate` id for id on a batch of
inputs of different lengths; seeded sampling draws token by token from transformers'
distribution, reproducibly, and top_k=1 is greedy; the generator keeps the decoder's layers
apart (sharded, no second copy, its `params` the run's); the `jaxlm generate` command, its
bad flags, and the runs it refuses.
"""

from __future__ import annotations

import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import cli
from jaxlm.checkpoint import rundir
from jaxlm.convert.hf_import import import_hf
from jaxlm.infer import run_params, seq2seq
from jaxlm.infer.beam import Beam, BeamError
from jaxlm.infer.generate import GenerationError, Sampling, sample
from jaxlm.model import zoo
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import rules

# ---- a stand-in encoder-decoder ------------------------------------------------------------

V, D, EOS, START = 5, 8, 1, 0


class StandIn:
    """encode / init_cache / decode_step of a tiny recurrent decoder over the mean of the
    encoded (unpadded) inputs; `select_rows` as the T5 module offers it."""

    def __init__(self, seed=0, vocab=V):
        rng = np.random.default_rng(seed)
        self.np = {"e_in": rng.normal(size=(vocab, D)), "p_in": rng.normal(size=(32, D)),
                   "e_out": rng.normal(size=(vocab, D)), "p_out": rng.normal(size=(32, D)),
                   "w": rng.normal(size=(D, vocab)) * 1.5}
        self.j = {k: jnp.asarray(v, jnp.float32) for k, v in self.np.items()}

    def encode(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
        return jnp.tanh(self.j["e_in"][tokens_BxS] + self.j["p_in"][:tokens_BxS.shape[1]])

    def init_cache(self, enc_BxSxD, enc_segment_ids_BxS, max_len):
        real = enc_segment_ids_BxS[..., None].astype(jnp.float32)
        ctx = (enc_BxSxD * real).sum(1) / real.sum(1)
        return {"ctx": ctx, "h": jnp.zeros_like(ctx), "index": jnp.int32(0)}

    def decode_step(self, tokens_BxN, cache):
        h = jnp.tanh(self.j["e_out"][tokens_BxN[:, 0]] + cache["ctx"] + 0.9 * cache["h"]
                     + self.j["p_out"][cache["index"]])
        logits = (h @ self.j["w"])[:, None]
        return logits, {"ctx": cache["ctx"], "h": h, "index": cache["index"] + 1}

    @staticmethod
    def select_rows(cache, rows_B):
        return {"ctx": cache["ctx"][rows_B], "h": cache["h"][rows_B], "index": cache["index"]}

    def logprobs64(self, inputs, prefix):
        """float64 log-probabilities of the token after decoder `prefix`, without a cache."""
        p = self.np
        ctx = np.tanh(p["e_in"][inputs] + p["p_in"][:len(inputs)]).mean(0)
        h = np.zeros(D)
        for i, tok in enumerate([START] + list(prefix)):
            h = np.tanh(p["e_out"][tok] + ctx + 0.9 * h + p["p_out"][i])
        logits = h @ p["w"]
        return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


STAND_INPUTS = [[2, 3, 4, 1], [4, 1], [3, 3, 2, 4, 2, 1]]


def stand_in_run(model, inputs, max_new, beam=None):
    """Greedy (beam None) or beam-searched ids of each input, through the device functions
    (jitted once per shape: the beam settings are traced)."""
    tokens, segments = seq2seq.pad_inputs([np.asarray(i, np.int32) for i in inputs], 8, 1)
    stop = jnp.asarray([EOS], jnp.int32)
    if beam is None:
        out, length = jax.jit(lambda t, s: seq2seq.sampled(
            model, t, s, START, stop, jax.random.key(0), max_new_tokens=max_new,
            sampling=Sampling()))(tokens, segments)
    else:
        key = (id(model), max_new, beam.num_beams, tokens.shape)
        if key not in _BEAM_FNS:
            _BEAM_FNS[key] = jax.jit(lambda t, s, scoring: seq2seq.beam_searched(
                model, model.select_rows, t, s, START, stop, scoring, max_new_tokens=max_new,
                num_beams=beam.num_beams, n_stop_ids=1))
        out, length, _ = _BEAM_FNS[key](tokens, segments, beam.scoring())
    return [np.asarray(out[i, :length[i]]).tolist() for i in range(len(inputs))]


_BEAM_FNS: dict = {}


def every_complete_sequence(model, inputs, max_new):
    """(float64 sum of log-probabilities, sequence) of every sequence that ends with EOS
    within max_new tokens or reaches max_new tokens."""
    out = []
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1] or (n < max_new and seq[-1] != EOS):
                continue
            total = sum(model.logprobs64(inputs, seq[:i])[seq[i]] for i in range(n))
            out.append((total, list(seq)))
    return out


def test_exhaustive_beam_search_finds_the_best_sequence():
    """num_beams = V ** max_new keeps every candidate, and early_stopping="never" only stops
    when no running beam can still win: the result is the best of all complete sequences by
    sum_logprobs / length ** length_penalty, enumerated in float64."""
    model, max_new = StandIn(seed=4), 3
    best = {}
    for length_penalty in (0.0, 1.0, 0.6, -0.5, 2.0):
        beam = Beam(V ** max_new, length_penalty=length_penalty, early_stopping="never")
        got = stand_in_run(model, STAND_INPUTS, max_new, beam)
        for i, (inputs, out) in enumerate(zip(STAND_INPUTS, got)):
            ranked = sorted(((s / len(q) ** length_penalty, q) for s, q in
                             every_complete_sequence(model, inputs, max_new)), reverse=True)
            assert ranked[0][0] - ranked[1][0] > 1e-2  # no near-tie decides it
            assert out == ranked[0][1], (length_penalty, i)
            best[length_penalty, i] = out
    # The penalty matters: ends with EOS after 1, 2 or 3 tokens, or at max_new without it.
    assert {len(o) for o in best.values()} == {1, 2, 3}
    assert best[-0.5, 1] != best[0.0, 1] and best[2.0, 2] != best[1.0, 2]


def test_stand_in_greedy_is_the_argmax_chain():
    model, max_new = StandIn(seed=1), 6
    got = stand_in_run(model, STAND_INPUTS, max_new)
    for inputs, out in zip(STAND_INPUTS, got):
        seq = []
        while len(seq) < max_new and (not seq or seq[-1] != EOS):
            seq.append(int(np.argmax(model.logprobs64(inputs, seq))))
        assert out == seq


def test_bad_beam_settings():
    with pytest.raises(BeamError, match="num_beams must be an integer >= 1"):
        Beam(0)
    with pytest.raises(BeamError, match="early_stopping must be true, false or 'never'"):
        Beam(2, early_stopping="sometimes")
    with pytest.raises(BeamError, match="length_penalty must be a finite number"):
        Beam(2, length_penalty=float("nan"))
    with pytest.raises(GenerationError, match="input 1: token id 9 is outside"):
        seq2seq.check_inputs([[1], [9]], 4, 8)
    with pytest.raises(GenerationError, match="max_new_tokens must be a positive integer"):
        seq2seq.check_inputs([[1]], 0, 8)


# ---- tiny random transformers T5 models, converted with `jaxlm convert from-hf` ------------

def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TESTS = pathlib.Path(__file__).parents[1]
EOS_T5 = 1
MAX_NEW = 12
# Encoder inputs of 7, 3 and 21 tokens (right-padded together), each ending with EOS.
INPUTS = [[5, 9, 17, 3, 44, 12, 1], [7, 8, 1], [int(t) for t in np.arange(10, 30) * 7 % 120 + 2]
          + [1]]
# The models: test_t5_parity's cases (H x d_kv != d_model, 2 encoder and 3 decoder layers,
# 8 relative buckets) and random weights, the EOS row of the head scaled by 1.5 so that
# sequences end at different lengths. v1.0's tied head makes a random model repeat its
# last token; embeddings and position biases of std 0.3 with projections of std 1 make
# it vary. The seeds give outputs of several tokens that differ between the beam settings.
ADJUST = {"v1_0_relu_tied": {"table": 0.3, "projections": 1 / 0.16},
          "v1_1_gated_untied": {"table": 1.0, "projections": 1.0}}


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """(case, seed) -> (transformers model, Seq2SeqGenerator of the converted run, run dir),
    built on first use."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")

    t5_parity = _load("jaxlm_tests_seq2seq_t5_parity", TESTS / "convert" / "test_t5_parity.py")
    hf_models = _load("jaxlm_tests_seq2seq_hf_models", TESTS / "convert" / "hf_models.py")
    built = {}
    # One torch thread: these models are tiny, and on a busy 2-core machine a second
    # thread spinning beside JAX's made one `generate` take seconds instead of 30 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(case, seed):
        if (case, seed) not in built:
            model = t5_parity.build_hf(case, seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "layer_norm" in name:
                        continue
                    table = "shared" in name or "lm_head" in name or "relative_attention" in name
                    p.mul_(ADJUST[case]["table" if table else "projections"])
                head = model.shared.weight if case.startswith("v1_0") else model.lm_head.weight
                head[EOS_T5] *= 1.5
            directory = tmp_path_factory.mktemp(f"{case}_{seed}")
            hf_models.save_hf(model, directory / "hf")
            (directory / "hf" / "tokenizer.json").write_text(t5_tokenizer_json())
            import_hf(directory / "hf", directory / "run", log=lambda line: None)
            generator = seq2seq.load(directory / "run")[0]
            built[case, seed] = (model, generator, directory / "run")
        return built[case, seed]
    yield get
    torch.set_num_threads(threads)


def t5_tokenizer_json(vocab_size: int = 128) -> str:
    """A word-level tokenizer.json as T5's ids go: <pad> 0, </s> 1, <unk> 2, then w3, w4 ...;
    its post-processor ends every sequence with </s>, as T5's tokenizer does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return tok.to_str()


def hf_generate(model, inputs, **settings) -> list[list[int]]:
    """transformers' `generate` on the right-padded batch: each row's ids after the decoder
    start, up to and with the first EOS. Without its cache: with more decoder than encoder
    layers, transformers 5's cache for T5 has too few layers; recomputing every step is the
    reference anyway."""
    import torch

    length = max(len(i) for i in inputs)
    ids = torch.zeros((len(inputs), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(inputs):
        ids[row, :len(i)] = torch.as_tensor(i)
        mask[row, :len(i)] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                             use_cache=False, **settings)
    rows = []
    for seq in out.tolist():
        assert seq[0] == 0  # the decoder start
        seq = seq[1:]
        rows.append(seq[:seq.index(EOS_T5) + 1] if EOS_T5 in seq else seq)
    return rows


def ours(generator, inputs=INPUTS, **settings) -> list[list[int]]:
    outs = generator.generate(inputs, MAX_NEW, decoder_start_id=0, stop_tokens=[EOS_T5],
                              **settings)
    return [o.tolist() for o in outs]


CASES = [("v1_0_relu_tied", 8), ("v1_1_gated_untied", 1)]


@pytest.mark.parametrize("case,seed", CASES)
def test_greedy_equals_transformers(t5_run, case, seed):
    model, generator, _ = t5_run(case, seed)
    assert generator.mesh.shape["fsdp"] == 8  # parameters and rows over 8 simulated devices
    got = ours(generator)
    assert got == hf_generate(model, INPUTS, do_sample=False, num_beams=1)
    assert len({t for row in got for t in row}) >= 6 and sum(len(r) for r in got) >= 14
    # each input alone gives what it gives in the padded batch
    assert [ours(generator, [i])[0] for i in INPUTS] == got


def test_generator_keeps_the_decoder_layers_apart(t5_run):
    """The generator holds each decoder layer's parameters apart in place of the stacked
    arrays (no second copy of the decoder), each sharded as its slice of the stack would
    be; `params` stacks them again: the run's parameters, bit for bit."""
    from jax.sharding import NamedSharding, PartitionSpec


    _, generator, run = t5_run("v1_1_gated_untied", 1)
    saved, step_dir = rundir.saved_config(run)
    restored = run_params.restore(mesh_lib.fit_mesh(saved), step_dir, generator.mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(generator.params),
                 jax.device_get(restored))
    kept = jax.tree.leaves((generator._rest, generator._layers))
    assert sum(a.size for a in kept) == sum(a.size for a in jax.tree.leaves(restored))
    assert "decoder_blocks" not in generator._rest and len(generator._layers) == 3
    stacks = rules.shardings_of(nnx.split(zoo.abstract(generator.cfg))[1], generator.mesh)
    for layer in generator._layers:
        for got, stack in zip(jax.tree.leaves(layer), jax.tree.leaves(stacks["decoder_blocks"])):
            want = NamedSharding(generator.mesh, PartitionSpec(*stack.spec[1:]))
            assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    assert any("fsdp" in str(a.sharding.spec) for a in jax.tree.leaves(generator._layers))


@pytest.mark.parametrize("case,seed", CASES)
def test_beam_search_equals_transformers(t5_run, case, seed):
    """3 and 4 beams, length penalties 1, 0.6 and 2, early stopping on and off (and
    "never"): the ids of transformers' `generate(num_beams=..., length_penalty=...,
    early_stopping=...)`."""
    model, generator, _ = t5_run(case, seed)
    results = {}
    grid = list(itertools.product((3, 4), (1.0, 0.6, 2.0), (True, False)))
    for num_beams, length_penalty, early in grid + [(3, 2.0, "never"), (4, 0.6, "never")]:
        got = ours(generator, beam=Beam(num_beams, length_penalty, early))
        want = hf_generate(model, INPUTS, do_sample=False, num_beams=num_beams,
                           length_penalty=length_penalty, early_stopping=early)
        assert got == want, (num_beams, length_penalty, early)
        results[num_beams, length_penalty, early] = tuple(map(tuple, got))
    # Each setting matters here: changing it alone changes some result.
    settings = grid
    for knob in range(3):
        assert any(results[a] != results[b] for a in settings for b in settings
                   if [x for i, x in enumerate(a) if i != knob] ==
                   [x for i, x in enumerate(b) if i != knob]), knob
    assert len({len(row) for rows in results.values() for row in rows}) >= 4


def test_sampling_draws_from_the_transformers_distribution(t5_run):
    """Seeded sampling (temperature, top-k, top-p) is, token by token, `sample` (jaxlm.infer.
    generate) applied to transformers' logits of the prefix with key fold_in(seed key, t):
    the batch row's draw (rows padded to the mesh's batch shards) from HF's distribution."""
    import torch


    model, generator, _ = t5_run("v1_1_gated_untied", 1)
    sampling = Sampling(temperature=0.8, top_k=40, top_p=0.9)
    got = ours(generator, sampling=sampling, seed=3)
    assert got == ours(generator, sampling=sampling, seed=3)
    assert got != ours(generator, sampling=sampling, seed=4)
    shards = mesh_lib.batch_shards(generator.mesh)
    rows = -(-len(INPUTS) // shards) * shards
    key = jax.random.key(3)
    for i, inputs in enumerate(INPUTS):
        prefix = [0]
        while len(prefix) <= MAX_NEW and prefix[-1] != EOS_T5:
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor([inputs]),
                               decoder_input_ids=torch.as_tensor([prefix])).logits[0, -1]
            batch = np.zeros((rows, logits.shape[-1]), np.float32)
            batch[i] = logits.numpy()
            prefix.append(int(sample(jnp.asarray(batch), jax.random.fold_in(key, len(prefix) - 1),
                                     sampling)[i]))
        assert got[i] == prefix[1:], i
    assert sum(len(r) for r in got) >= 10
    # top_k=1 keeps only the likeliest token: greedy, whatever the temperature and seed
    greedy = ours(generator)
    for seed in (0, 1):
        assert ours(generator, sampling=Sampling(temperature=1.3, top_k=1), seed=seed) == greedy


def test_generate_command_on_a_converted_t5(t5_run, tmp_path, capsys):
    """`jaxlm generate` on a run converted from transformers prints, for each prompt, what
    transformers gives: its tokenizer (the input ends with </s>), beam search, its decode."""
    transformers = pytest.importorskip("transformers")
    import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)


    model, _, run = t5_run("v1_1_gated_untied", 1)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(run.parent / "hf" /
                                                                     "tokenizer.json"))
    prompts = ["w5 w9 w17 w3 w44 w12", "w7 w8"]
    inputs = [hf_tok(p).input_ids for p in prompts]
    assert inputs == [INPUTS[0], INPUTS[1]]  # T5's convention: EOS at the end, no BOS
    texts = [hf_tok.decode(ids, skip_special_tokens=True) for ids in hf_generate(
        model, inputs, do_sample=False, num_beams=4, length_penalty=2.0, early_stopping=False)]
    assert all(len(t.split()) >= 5 for t in texts)
    result = run_fixture.jaxlm_cli("generate", "--workdir", run, "--prompt", prompts[0],
                                   "--prompt", prompts[1], "--num-beams", "4",
                                   "--length-penalty", "2", "--early-stopping", "false",
                                   "--max-new-tokens", MAX_NEW, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "".join(f"--- prompt {i} ---\n{t}\n" for i, t in enumerate(texts))

    # Bad flags: one line naming them, exit 2, before anything is read or compiled.
    bad = {("--num-beams", "0"): "--num-beams 0: must be at least 1",
           ("--length-penalty", "0.6"): "--length-penalty applies to beam search",
           ("--early-stopping", "true"): "--early-stopping applies to beam search",
           ("--num-beams", "3", "--temperature", "0.7"): "--temperature: beam search is "
                                                           "deterministic",
           ("--num-beams", "65"): "num_beams=65 keeps 130 candidates per step, more than "
                                  "the 128 ids"}
    for flags, message in bad.items():
        assert cli.main(["generate", "--workdir", str(run), "--prompt", "w5", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxlm: ") and message in err and err.count("\n") == 1, err


def test_generate_command_refuses_what_it_cannot_run(tmp_path, capsys):
    """An encoder-only run (bert) has no decoder; beam search is for encoder-decoders."""

    hf_models = _load("jaxlm_tests_seq2seq_hf_models", TESTS / "convert" / "hf_models.py")
    for family in ("bert", "llama"):
        hf_models.write_hf_dir(tmp_path / f"{family}_hf", hf_models.tiny_cfg(family))
        import_hf(tmp_path / f"{family}_hf", tmp_path / family, log=lambda line: None)
    assert cli.main(["generate", "--workdir", str(tmp_path / "bert"), "--prompt", "w5"]) == 2
    assert capsys.readouterr().err == (
        f"jaxlm: {tmp_path / 'bert'}: family 'bert' is an encoder-only model: it has no "
        f"decoder to generate text with (generate runs decoder and encoder-decoder families)\n")
    assert cli.main(["generate", "--workdir", str(tmp_path / "llama"), "--prompt", "w5",
                     "--num-beams", "2"]) == 2
    assert capsys.readouterr().err == ("jaxlm: --num-beams 2: beam search is for encoder-decoder "
                                       "runs (family t5); this run is a decoder\n")
