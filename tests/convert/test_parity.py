"""Logit parity with Hugging Face transformers, both directions, max |diff| <= 1e-4 (float32).

HF -> jaxlm: a tiny random HF model is saved with save_pretrained, converted with
`jaxlm convert from-hf`, restored through jaxlm's own checkpoint code and run by jaxlm.
jaxlm -> HF: random jaxlm parameters are saved as a run, exported with `to-hf` and loaded
with AutoModelForCausalLM.from_pretrained. Skipped without torch/transformers.
"""

import json

import jax
import numpy as np
import pytest

from jaxlm import cli
from jaxlm.checkpoint import manager as checkpoint
from jaxlm.checkpoint import rundir
from jaxlm.checkpoint.inspect import inspect_checkpoint
from jaxlm.convert import hf_export, hf_import
from jaxlm.convert import params as params_lib
from jaxlm.convert import safetensors_io as st
from jaxlm.data import pipeline, tokenizers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def tokens_for(model_cfg, seed=0):
    length = min(32, model_cfg.max_seq_len)
    return np.random.default_rng(seed).integers(0, model_cfg.vocab_size, (2, length))


def restore_run(workdir):
    """(model config from the run's metadata, parameters) through jaxlm's checkpoint code."""
    info = inspect_checkpoint(workdir)
    model_cfg = rundir.config_of({"config": info["config"]}, workdir).model
    shapes, _ = params_lib.abstract_params(model_cfg)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = params_lib.unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cpu)
                                     for k, v in shapes.items()})
    return model_cfg, checkpoint.restore_params(workdir, abstract)


def max_diff(a, b):
    return float(np.max(np.abs(a - b)))


def trained_ids(tok, text):
    """The ids jaxlm's pipeline trains on for a document `text`, less its closing EOS."""
    ids = pipeline._Tokenize(tok)({"text": text}).tolist()
    assert ids[-1] == tok.eos_id
    return ids[:-1]


@pytest.mark.parametrize("case", ["llama_gqa_untied", "llama_tied_llama3", "llama_mqa_linear",
                                  "mistral_window", "qwen2_bias_tied", "gpt2_tied", "gpt2_untied",
                                  "mixtral_top2", "qwen2_moe_shared"])
def test_import_matches_transformers(case, hf_saved, hf_models_module, tmp_path):
    model, hf_dir = hf_saved(case)
    summary = hf_import.import_hf(hf_dir, tmp_path / "run", log=lambda _: None)
    model_cfg, params = restore_run(tmp_path / "run")
    assert summary["param_count"] == sum(p.numel() for p in model.parameters())
    tokens = tokens_for(model_cfg)
    expected = hf_models_module.hf_logits(model, tokens)
    logits = hf_models_module.jaxlm_logits(model_cfg, params, tokens)
    assert float(np.std(expected)) > 0.5  # random weights: a nontrivial logit scale
    assert max_diff(logits, expected) <= TOLERANCE

    if model_cfg.rope_scaling.type != "none":  # the scaling is what makes them agree
        unscaled = model_cfg.copy_and_resolve_references()
        unscaled.rope_scaling.type = "none"
        assert max_diff(hf_models_module.jaxlm_logits(unscaled, params, tokens), expected) > 1e-2
    if case == "mistral_window":
        assert model_cfg.max_seq_len == 32 and "sliding_window=32" in summary["notes"][0]


@pytest.mark.parametrize("case,model_type", [
    ("llama_gqa_untied", "llama"), ("llama_tied_llama3", "llama"), ("llama_mqa_linear", "llama"),
    ("qwen2_bias_tied", "qwen2"), ("gpt2_tied", "gpt2"), ("gpt2_untied", "gpt2"),
    ("mixtral_top2", "mixtral"), ("qwen2_moe_shared", "qwen2_moe")])
def test_export_matches_transformers(case, model_type, hf_saved, hf_models_module, tmp_path):
    _, hf_dir = hf_saved(case)
    model_cfg = hf_import.open_checkpoint(hf_dir).model_cfg  # the architecture only
    shapes, axes = params_lib.abstract_params(model_cfg)
    flat = hf_models_module.random_jaxlm_params({k: v.shape for k, v in shapes.items()}, seed=5)
    run = tmp_path / "run"
    run.mkdir()
    params_lib.write_checkpoint(run, params_lib.run_config(model_cfg, run, "byte"), flat, axes, "byte")
    tokenizers.ByteTokenizer().save(run / "tokenizer")

    hf_export.export_hf(run, tmp_path / "hf", log=lambda _: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    assert model.config.model_type == model_type
    if not model_type.startswith("qwen2"):  # AutoTokenizer builds Qwen's own (hf_export docstring)
        text = "héllo wörld ✓\n"
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
        assert hf_tok(text)["input_ids"] == trained_ids(tokenizers.ByteTokenizer(), text)
    tokens = tokens_for(model_cfg, seed=1)
    expected = hf_models_module.jaxlm_logits(model_cfg, params_lib.unflatten(flat), tokens)
    assert max_diff(hf_models_module.hf_logits(model, tokens), expected) <= TOLERANCE


def test_round_trip_bfloat16_sharded_is_exact(hf_models_module, tmp_path):
    """bfloat16 HF shards -> jaxlm (float32) -> bfloat16 HF shards: every tensor bit for bit,
    through the command line, and the jaxlm run matches the bfloat16 model's logits."""
    model = hf_models_module.build_hf("qwen2_bias_tied", seed=3).to(torch.bfloat16)
    hf_models_module.save_hf(model, tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / st.INDEX_FILE).is_file()
    assert cli.main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert cli.main(["checkpoint", "inspect", str(tmp_path / "run")]) == 0
    assert cli.main(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"),
                     "--dtype", "bfloat16", "--max-shard-size", "30KB"]) == 0
    original = st.read_headers(st.checkpoint_files(tmp_path / "hf"))
    exported = st.read_headers(st.checkpoint_files(tmp_path / "back"))
    assert len(st.checkpoint_files(tmp_path / "back")) > 1
    assert set(exported) == set(original)
    for name, info in original.items():
        assert exported[name].dtype == "BF16" and exported[name].shape == info.shape
        np.testing.assert_array_equal(st.read_tensor(exported[name]).view(np.uint16),
                                      st.read_tensor(info).view(np.uint16), err_msg=name)

    model_cfg, params = restore_run(tmp_path / "run")
    tokens = tokens_for(model_cfg, seed=2)
    # Loaded afresh in float32 (model.float() would keep the rotary table rounded to bfloat16).
    original_f32 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    expected = hf_models_module.hf_logits(original_f32, tokens)
    assert max_diff(hf_models_module.jaxlm_logits(model_cfg, params, tokens), expected) <= TOLERANCE
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", dtype=torch.float32, attn_implementation="eager")
    assert max_diff(hf_models_module.hf_logits(reloaded, tokens), expected) <= TOLERANCE
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["tie_word_embeddings"] is True


def test_tokenizers_survive_both_directions(hf_saved, tmp_path):
    """The imported tokenizer keeps config.json's special ids and its BOS convention (this
    tokenizer.json has no post-processor: no BOS, as in transformers); exported tokenizers
    (a Hugging Face one; the same run saved before the convention was recorded, which
    trained with BOS; jaxlm's byte tokenizer rebuilt as tokenizer.json) give with their
    special tokens the ids jaxlm trains with, and decode as jaxlm's do."""
    _, hf_dir = hf_saved("llama_gqa_untied")
    hf_import.import_hf(hf_dir, tmp_path / "run", log=lambda _: None)
    tok = tokenizers.load_saved(tmp_path / "run" / "tokenizer")
    assert (tok.name, tok.bos_id, tok.eos_id, tok.adds_bos) == ("hf", 1, 2, False)
    text = "w4 w17 w99 w5"
    hf_export.export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _: None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(text)["input_ids"] == trained_ids(tok, text) == tok.encode(text).tolist()
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<s>", "</s>")

    saved = tmp_path / "run" / "tokenizer" / tokenizers.SAVED_CONFIG
    config = json.loads(saved.read_text())
    del config["adds_bos"]  # as written before the convention was recorded
    saved.write_text(json.dumps(config))
    old = tokenizers.load_saved(tmp_path / "run" / "tokenizer")
    assert trained_ids(old, text) == [1] + tok.encode(text).tolist()
    hf_export.export_hf(tmp_path / "run", tmp_path / "hf_old", log=lambda _: None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_old")
    assert hf_tok(text)["input_ids"] == trained_ids(old, text)
    assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text

    byte_json = hf_export.byte_tokenizer_json()
    from tokenizers import Tokenizer
    backend = Tokenizer.from_str(byte_json)
    byte_tok = tokenizers.ByteTokenizer()
    for sample in ["plain ascii", "héllo wörld ✓ — 日本語", " leading space\nnew line\t"]:
        ids = byte_tok.encode(sample).tolist()
        assert backend.encode(sample, add_special_tokens=False).ids == ids
        assert backend.encode(sample).ids == trained_ids(byte_tok, sample) == [1] + ids
        assert backend.decode(ids) == backend.decode([1] + ids) == sample


@pytest.mark.parametrize("kind,add_bos_token,adds_bos", [
    ("tokenizer.json", False, True),  # its post-processor ("<s> $A") decides
    ("tokenizer.model", False, False), ("tokenizer.model", True, True)])
def test_import_follows_transformers_bos_convention(kind, add_bos_token, adds_bos,
                                                    hf_models_module, tmp_path):
    """The imported run starts sequences as transformers' AutoTokenizer does: a
    tokenizer.json by its post-processor, a SentencePiece tokenizer.model by
    tokenizer_config.json's add_bos_token."""
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf",
                                           hf_models_module.tiny_cfg(vocab_size=384))
    text = "w4 w17 w99 w5"
    if kind == "tokenizer.json":
        (hf_dir / kind).write_text(hf_models_module.tokenizer_json(bos_template=True))
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
    else:
        (hf_dir / "tokenizer.json").unlink()
        text = "the quick fox 42 jumps"
        docs = [f"the quick brown fox {i} jumps over the lazy dog {7 * i}" for i in range(200)]
        tokenizers.train_sentencepiece(iter(docs), hf_dir / kind, 300)
        settings = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False}
        hf_models_module.edit_config(hf_dir, bos_token_id=2, eos_token_id=3)
    settings["add_bos_token"] = add_bos_token
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    hf_import.import_hf(hf_dir, tmp_path / "run", log=lambda _: None)
    tok = tokenizers.load_saved(tmp_path / "run" / "tokenizer")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.adds_bos == adds_bos
    assert hf_tok(text)["input_ids"] == trained_ids(tok, text)


def test_sentencepiece_tokenizer_both_directions(tmp_path):
    """A checkpoint with only a SentencePiece tokenizer.model imports it; the export's
    tokenizer.model loads in AutoTokenizer and encodes as jaxlm does."""
    from jaxlm import config as config_lib
    from jaxlm.bench import convert as bench

    docs = [f"the quick brown fox {i} jumps over the lazy dog number {7 * i}" for i in range(200)]
    sp_path = tokenizers.train_sentencepiece(iter(docs), tmp_path / "sp" / "tok.model", 300)
    model_cfg = config_lib.defaults().model
    model_cfg.update(dict(vocab_size=384, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                          d_ff=48, max_seq_len=64))
    bench.write_random_hf(tmp_path / "hf", model_cfg, shards=1)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(sp_path.read_bytes())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(bos_token_id=2, eos_token_id=3)  # as jaxlm's SentencePiece training sets them
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    hf_import.import_hf(tmp_path / "hf", tmp_path / "run", log=lambda _: None)
    tok = tokenizers.load_saved(tmp_path / "run" / "tokenizer")
    assert (tok.name, tok.bos_id, tok.eos_id) == ("sentencepiece", 2, 3)
    hf_export.export_hf(tmp_path / "run", tmp_path / "back", log=lambda _: None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for text in ["the quick fox 42", " leading space\nand a new line", "over  the lazy dog"]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text).tolist(), text
        assert hf_tok(text)["input_ids"] == trained_ids(tok, text), text  # BOS first
