"""Generation with the KV cache against no-cache references: cached greedy decoding equals the
argmax of the full forward pass over the growing sequence, padded batches equal each prompt
alone, sharded equals unsharded; sampling filters against NumPy; stop tokens; bad input;
the `jaxlm generate` command."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_fixture  # tests/run_fixture.py (tests/ is on sys.path: tests/conftest.py)
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.infer.generate import (
    GenerationError,
    Generator,
    Sampling,
    filter_logits,
    sample,
)
from jaxlm.model import kv_cache, zoo
from jaxlm.parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).parents[2]
VOCAB = 128
NEW = 10
PROMPTS = [[5, 9, 17, 3, 44], [7, 8], [int(t) for t in np.arange(1, 21) * 5 % VOCAB]]


def model_cfg(family="llama"):
    cfg = config_lib.defaults().model
    cfg.update(dict(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=4 if family == "gpt2" else 2, d_ff=48, max_seq_len=64,
                    remat="none"))
    if family == "moe":  # decoding routes each new token (dropless: alone, as in the batch)
        cfg.update(n_experts=4, experts_per_token=2, d_expert=24)
    return cfg


def make_params(cfg, seed=1):
    return run_fixture.random_params(nnx.to_pure_dict(nnx.state(zoo.create(cfg))), seed)


@pytest.fixture(scope="module", params=["llama", "gpt2", "moe"])
def family_gen(request):
    cfg = model_cfg(request.param)
    return Generator(cfg, make_params(cfg))


@pytest.fixture(scope="module")
def gen():
    cfg = model_cfg()
    return Generator(cfg, make_params(cfg))


def full_forward_fn(generator):
    """Logits of every position of one right-padded row, without any cache (causal: the
    logits at position i do not depend on what follows i)."""
    fwd = jax.jit(lambda p, t: nnx.merge(generator.graphdef, p)(t)[0])
    return lambda ids: np.asarray(fwd(generator.params, jnp.asarray(
        [list(ids) + [0] * (48 - len(ids))])))[len(ids) - 1]


def stream_all(generator, prompts, new=NEW, **kwargs):
    tokens, logits = [], []
    for tok_B, live_B, logits_BxV in generator.stream(prompts, new, logits=True, **kwargs):
        tokens.append(tok_B)
        logits.append(logits_BxV)
    return np.stack(tokens, 1), np.stack(logits, 1)


def test_cached_greedy_equals_argmax_of_full_forward(family_gen):
    last_logits = full_forward_fn(family_gen)
    generated = set()
    for prompt in PROMPTS:
        tokens, logits = stream_all(family_gen, [prompt])
        seq = list(prompt)
        for t in range(NEW):
            ref = last_logits(seq)
            np.testing.assert_allclose(logits[0, t], ref, rtol=1e-4, atol=1e-4)
            seq.append(int(np.argmax(ref)))
        assert tokens[0].tolist() == seq[len(prompt):]
        generated |= set(seq[len(prompt):])
    assert len(generated) >= 5  # outputs vary: a wrong cache would show


def test_padded_batch_equals_each_prompt_alone(family_gen):
    # Lengths 5, 2 and 20 pad to 32 slots together, to 16, 16 and 32 alone.
    tokens, logits = stream_all(family_gen, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone_tokens, alone_logits = stream_all(family_gen, [prompt])
        assert tokens[i].tolist() == alone_tokens[0].tolist()
        np.testing.assert_allclose(logits[i], alone_logits[0], rtol=1e-5, atol=1e-5)


def test_sharded_generation_equals_unsharded(gen):
    mesh_cfg = config_lib.defaults().mesh
    mesh_cfg.update(fsdp=4, tensor=2)
    mesh = mesh_lib.make_mesh(mesh_cfg)
    sharded = Generator(gen.cfg, gen.params, mesh)
    assert sharded.params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    tokens, logits = stream_all(sharded, PROMPTS)  # 3 rows, padded to the 4 batch shards
    ref_tokens, ref_logits = stream_all(gen, PROMPTS)
    assert tokens.tolist() == ref_tokens.tolist()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)

    # The cache is sharded like activations (rows over fsdp, kv heads over tensor) and the
    # decode step reuses its buffer (donated).
    batch = sharded._prepare(PROMPTS, NEW)
    stop = jnp.asarray([-1])
    with mesh_lib.use(sharded.mesh):
        cache, token, done, _ = sharded._prefill(
            sharded.params, jax.device_put(batch.tokens_BxP, sharded._batch_sharding),
            jax.device_put(batch.start_B, sharded._row_sharding), jax.random.key(0), stop,
            sampling=Sampling(), cache_len=batch.cache_len)
        assert cache.k.shape == (2, 4, 2, 32 + NEW, 8)
        assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        new_cache = sharded._decode(sharded.params, cache, token, done, jax.random.key(0),
                                    np.int32(1), np.int32(NEW), stop, sampling=Sampling(),
                                    with_logits=False)[0]
    assert cache.k.is_deleted() and new_cache.k.sharding == cache.k.sharding


def everything_streamed(generator, prompts, new, **kwargs):
    """Every (tokens, live, logits) the stream yields, as lists."""
    return [tuple(np.asarray(x).tolist() for x in out)
            for out in generator.stream(prompts, new, logits=True, **kwargs)]


@pytest.fixture(scope="module")
def by_block(gen):
    """The same model decoding 1 (a call per token), 3 and 16 tokens per device call."""
    return {block: Generator(gen.cfg, gen.params, block=block) for block in (1, 3, 16)}


def one_model_call_per_token(gen, prompts, new, sampling, seed):
    """Tokens and logits B x new (x V) from the prefill and then one plain model call per
    token, sampled with key fold_in(seed key, t) for token t + 1: written here, not with the
    generator's decode loop."""
    batch = gen._prepare(prompts, new)
    key, stop = jax.random.key(seed), jnp.asarray([-1], jnp.int32)
    with mesh_lib.use(gen.mesh):
        cache, token_B, _, logits_BxV = gen._prefill(
            gen.params, jnp.asarray(batch.tokens_BxP), jnp.asarray(batch.start_B), key, stop,
            sampling=sampling, cache_len=batch.cache_len)
    model = nnx.merge(gen.graphdef, gen.params)
    step = jax.jit(lambda cache, token_B: model(token_B[:, None], kv_cache.positions(cache, 1),
                                                 cache=cache))
    tokens, logits = [token_B], [logits_BxV]
    for t in range(1, new):
        logits_Bx1xV, cache = step(cache, tokens[-1])
        logits.append(logits_Bx1xV[:, 0])
        tokens.append(sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, t), sampling))
    rows = len(prompts)
    return (np.stack([np.asarray(t) for t in tokens], 1)[:rows],
            np.stack([np.asarray(x, np.float32) for x in logits], 1)[:rows])


@pytest.mark.parametrize("sampling, seed", [(Sampling(), 0),
                                            (Sampling(temperature=0.9, top_p=0.9), 3)])
def test_blocks_equal_one_plain_model_call_per_token(by_block, sampling, seed):
    new = 2 * NEW + 1
    want_tokens, want_logits = one_model_call_per_token(by_block[1], PROMPTS, new, sampling,
                                                        seed)
    for block in (1, 3, 16):
        tokens, logits = stream_all(by_block[block], PROMPTS, new, sampling=sampling, seed=seed)
        assert tokens.tolist() == want_tokens.tolist(), block
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling, seed", [(Sampling(), 0),
                                            (Sampling(temperature=0.9, top_p=0.9), 3)])
def test_decoding_blocks_of_tokens_equals_a_call_per_token(by_block, sampling, seed):
    """Several tokens per device call yield exactly what one call per token yields: tokens,
    live flags and logits, greedy and seeded sampling, with a stop token that ends a row
    inside a block (and the run once every row has stopped)."""
    new = 2 * NEW + 1  # blocks of 3 and 16: full blocks, a short last one
    free = everything_streamed(by_block[1], PROMPTS, new, sampling=sampling, seed=seed)
    each_row = [free[4][0][0], free[2][0][1], free[1][0][2]]  # a token of every row
    for stop in ([], each_row[:1], each_row):
        reference = everything_streamed(by_block[1], PROMPTS, new, sampling=sampling,
                                        seed=seed, stop_tokens=stop)
        for block in (3, 16):
            got = everything_streamed(by_block[block], PROMPTS, new, sampling=sampling,
                                      seed=seed, stop_tokens=stop)
            assert [(t, live) for t, live, _ in got] == [(t, live) for t, live, _ in reference]
            np.testing.assert_array_equal(np.array([lg for _, _, lg in got]),
                                          np.array([lg for _, _, lg in reference]))
    assert len(reference) < new  # the last stop list ends every row early


def test_top_k_1_sampling_equals_greedy(gen):
    greedy = gen.generate(PROMPTS, NEW)
    for seed in (0, 1):
        sampled = gen.generate(PROMPTS, NEW, Sampling(temperature=1.3, top_k=1), seed=seed)
        assert [s.tolist() for s in sampled] == [g.tolist() for g in greedy]


def test_sampling_is_reproducible_and_varies_with_seed(gen):
    hot = Sampling(temperature=2.0)
    a = gen.generate(PROMPTS, NEW, hot, seed=3)
    b = gen.generate(PROMPTS, NEW, hot, seed=3)
    c = gen.generate(PROMPTS, NEW, hot, seed=4)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]


def test_stop_tokens_end_their_row_only(gen):
    greedy = gen.generate(PROMPTS, NEW)
    stop = int(greedy[0][3])
    outs = gen.generate(PROMPTS, NEW, stop_tokens=[stop])
    for g, out in zip(greedy, outs):
        g = g.tolist()
        expected = g[:g.index(stop) + 1] if stop in g else g
        assert out.tolist() == expected
    assert len(outs[0]) <= 4


def reference_filtered_probs(logits, temperature, top_k, top_p):
    """float64 NumPy: temperature, then keep the top k, then the smallest prefix of the
    remaining tokens (by probability) whose mass reaches top_p."""
    x = logits.astype(np.float64) / (temperature or 1.0)
    out = np.zeros_like(x)
    for r, row in enumerate(x):
        keep = np.ones(row.size, bool)
        if 0 < top_k < row.size:
            keep &= row >= np.sort(row)[-top_k]
        probs = np.where(keep, np.exp(row - row.max()), 0.0)
        probs /= probs.sum()
        if top_p < 1:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]
            kept = np.zeros(row.size, bool)
            kept[order[before < top_p]] = True
            probs = np.where(kept, probs, 0.0)
            probs /= probs.sum()
        out[r] = probs
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.6), (1.5, 12, 0.8), (0.5, 3, 0.9), (1.0, 40, 0.3)])
def test_filtered_distribution_against_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32) * 2.0
    sampling = Sampling(temperature, top_k, top_p)
    probs = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits), sampling), axis=-1))
    ref = reference_filtered_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(probs, ref, atol=1e-6)
    assert ((probs > 0) == (ref > 0)).all()


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.8), Sampling(1.2, top_k=4, top_p=0.9)])
def test_sample_frequencies_follow_the_filtered_distribution(sampling):
    logits = jnp.asarray([[1.0, 0.5, -0.2, 0.0, 2.0, -1.0, 0.3, 1.5]])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, sampling)[0]))(keys))
    freq = np.bincount(draws, minlength=8) / n
    ref = reference_filtered_probs(np.asarray(logits), sampling.temperature, sampling.top_k,
                                   sampling.top_p)[0]
    assert np.all(freq[ref == 0] == 0)
    # 5 standard deviations of a frequency estimated from n draws
    np.testing.assert_array_less(np.abs(freq - ref), 5 * np.sqrt(ref * (1 - ref) / n) + 1e-9)


def test_bad_input_is_reported_before_compiling(gen):
    with pytest.raises(GenerationError, match=r"prompt 1 has 60 tokens; with max_new_tokens=10 .*"
                                              r"70 positions.*64 \(model.max_seq_len\)"):
        gen.generate([[1, 2], [3] * 60], NEW)
    with pytest.raises(GenerationError, match="prompt 0: token id 128 is outside"):
        gen.generate([[1, 128]], NEW)
    with pytest.raises(GenerationError, match="prompt 1: expected a non-empty list"):
        gen.generate([[1], []], NEW)
    with pytest.raises(GenerationError, match="max_new_tokens must be a positive integer"):
        gen.generate([[1]], 0)
    with pytest.raises(GenerationError, match="top_p must be in"):
        Sampling(top_p=0.0)
    with pytest.raises(GenerationError, match="temperature must be >= 0"):
        Sampling(temperature=-1.0)


@pytest.mark.slow
def test_generate_command_streams_the_greedy_text(stdlib_data_dir, tmp_path, capsys):
    cfg = run_fixture.tiny_run_config(stdlib_data_dir)
    workdir = tmp_path / "run"
    params = run_fixture.write_run(workdir, cfg)
    from jaxlm.data.tokenizers import ByteTokenizer
    from jaxlm.infer.generate import encode_prompt
    tok = ByteTokenizer()
    expected = Generator(cfg.model, params).generate(
        [encode_prompt(tok, "def f(")], 20, stop_tokens=[tok.eos_id])[0]
    expected = tok.decode([t for t in expected if t != tok.eos_id])
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "generate", "--workdir", str(workdir), "--prompt",
         "def f(", "--max-new-tokens", "20"], capture_output=True, text=True, timeout=300,
        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "def f(" + expected + "\n"

    from jaxlm import cli
    assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "x" * 60]) == 2
    err = capsys.readouterr().err
    assert "prompt 0 has 61 tokens" in err and "model.max_seq_len" in err
    vocab = cfg.model.vocab_size
    assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "x", "--stop-id",
                     str(vocab)]) == 2
    assert capsys.readouterr().err == (f"jaxlm: --stop-id {vocab}: not an id of this model's "
                                       f"vocabulary [0, {vocab})\n")


def load_hf_models():
    """tests/convert/hf_models.py (tiny random transformers models), loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "jaxlm_tests_convert_hf_models", pathlib.Path(__file__).parents[1] / "convert" / "hf_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["llama_gqa_untied", "llama_tied_llama3", "qwen2_bias_tied",
                                  "gpt2_tied", "mixtral_top2", "qwen2_moe_shared"])
def test_greedy_equals_hugging_face_generate(case, tmp_path):
    """A tiny random transformers model, saved as safetensors and imported with jaxlm's
    converter: greedy generation matches `model.generate` token for token, alone and in a
    padded batch."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from jaxlm.convert import hf_import
    from jaxlm.convert import params as params_lib

    hf_models = load_hf_models()
    hf_model = hf_models.build_hf(case, seed=5)
    hf_models.save_hf(hf_model, tmp_path / "hf", tokenizer=False)
    ckpt = hf_import.open_checkpoint(tmp_path / "hf")
    generator = Generator(ckpt.model_cfg, params_lib.unflatten(hf_import.read_params(ckpt)))
    eos = hf_model.config.eos_token_id
    prompts = [[1, 5, 9, 17, 3, 44], [1, 7, 8], [1] + [int(t) for t in np.arange(2, 22) * 5 % 128]]
    ours = generator.generate(prompts, 12, stop_tokens=[eos])
    for prompt, out in zip(prompts, ours):
        ids = torch.as_tensor([prompt])
        with torch.no_grad():
            theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert out.tolist() == theirs[0, len(prompt):].tolist()
    assert sum(len(o) for o in ours) >= 18 and len({t for o in ours for t in o.tolist()}) >= 5


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_generate_command_on_a_converted_hugging_face_model(style, tmp_path, capsys):
    """`jaxlm convert from-hf` then `jaxlm generate --prompt TEXT` prints what transformers
    gives for TEXT (its tokenizer, greedy `generate`, its decode): a GPT-2-style tokenizer
    adds no BOS (ByteLevel post-processor), a Llama-style one does (TemplateProcessing)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxlm import cli
    from jaxlm.convert.hf_import import import_hf

    hf_models = load_hf_models()
    if style == "gpt2":
        tokenizer, vocab = hf_models.gpt2_tokenizer_json()
        hf_model = hf_models.build_hf("gpt2_tied", seed=7, vocab_size=vocab, bos_token_id=0,
                                      eos_token_id=0)
        prompt = "the cat sat on"
    else:
        tokenizer = hf_models.tokenizer_json(hf_models.VOCAB, bos_template=True)
        hf_model = hf_models.build_hf("llama_gqa_untied", seed=7)
        prompt = "w5 w9 w17 w40"
    hf_models.save_hf(hf_model, tmp_path / "hf", tokenizer=False)
    (tmp_path / "hf" / "tokenizer.json").write_text(tokenizer)
    import_hf(tmp_path / "hf", tmp_path / "run", log=lambda line: None)
    assert cli.main(["generate", "--workdir", str(tmp_path / "run"), "--prompt", prompt,
                     "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    inputs = hf_tok(prompt, return_tensors="pt")
    assert (inputs.input_ids[0, 0].item() == hf_model.config.bos_token_id) == (style == "llama")
    with torch.no_grad():
        theirs = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                   pad_token_id=hf_model.config.eos_token_id)
    assert printed == hf_tok.decode(theirs[0], skip_special_tokens=True) + "\n"
    assert len(printed) > len(prompt) + 4
