"""The bert family's Hugging Face mapping (BERT, RoBERTa): masked-LM logit parity with
transformers in both directions, max |diff| <= 1e-4 (float32), and every unsupported
variant refused with one line naming the key.

HF -> jaxlm: tiny random BertForMaskedLM / RobertaForMaskedLM (odd shapes: d_model 36, 3
heads of 12, d_ff 52, vocab 99), saved with save_pretrained, converted with
`jaxlm convert from-hf`, restored through jaxlm's checkpoint code and run with token types
and with padding. jaxlm -> HF: random jaxlm parameters, `jaxlm convert to-hf`, loaded with
AutoModelForMaskedLM.from_pretrained (no missing or unexpected weights).
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import cli
from jaxlm.convert import hf_export, hf_import
from jaxlm.convert import params as params_lib
from jaxlm.convert import safetensors_io as st
from jaxlm.data import tokenizers
from jaxlm.model import zoo

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# restore_run, max_diff and TOLERANCE of the llama/gpt2 parity tests, loaded by path under a
# unique name (as conftest.py loads hf_models.py).
_spec = importlib.util.spec_from_file_location(
    "jaxlm_tests_convert_parity", pathlib.Path(__file__).with_name("test_parity.py"))
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

VOCAB = 99
SHAPES = dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=52,
              vocab_size=VOCAB, layer_norm_eps=1e-5)
# name -> (model_type, config); RoBERTa: pad 1, so positions read rows 2.. of 42.
CASES = {
    "bert": ("bert", dict(max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu",
                          pad_token_id=0)),
    "bert_tanh_types3": ("bert", dict(max_position_embeddings=40, type_vocab_size=3,
                                      hidden_act="gelu_pytorch_tanh", pad_token_id=0)),
    "roberta": ("roberta", dict(max_position_embeddings=42, type_vocab_size=1,
                                hidden_act="gelu", pad_token_id=1, bos_token_id=0,
                                eos_token_id=2)),
}
SPECIALS = {"bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
            "roberta": ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
PAD = {"bert": 0, "roberta": 1}


def tokenizer_json(model_type: str, vocab_size: int = 90) -> str:
    """A word-level tokenizer.json with the model type's special tokens first (BERT:
    [PAD] = 0; RoBERTa: <s> <pad> </s> = 0 1 2) then w5, w6, ..."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = SPECIALS[model_type]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1 if model_type == "bert" else 3]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return tok.to_str()


def randomize(model, seed: int) -> None:
    """Values far from HF's init: weights std 0.16, LayerNorm scales 1 +- 0.3, biases std
    0.2 (hf_models.randomize, for BERT's "LayerNorm" names too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name.lower():
                p.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.16 * noise)


def build_hf(case: str, seed: int):
    model_type, overrides = CASES[case]
    config_class = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}
    config = config_class[model_type](**{**SHAPES, **overrides})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForMaskedLM.from_config(config).float().eval()
    randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """case -> (torch model, saved directory), built on first use."""
    built = {}

    def get(case):
        if case not in built:
            model = build_hf(case, seed=len(case))
            directory = tmp_path_factory.mktemp(f"hf_{case}")
            model.save_pretrained(directory)
            (directory / "tokenizer.json").write_text(tokenizer_json(CASES[case][0]))
            built[case] = (model, directory)
        return built[case]
    return get


def batch(model_cfg, pad: int, seed: int):
    """Two rows of max length (jaxlm positions 0..L-1 from row position_offset); the second
    right-padded with `pad` after 13 tokens; random token types. Real tokens are never the
    pad id (RoBERTa counts positions over the tokens that are not padding)."""
    length = model_cfg.max_seq_len - model_cfg.position_offset
    rng = np.random.default_rng(seed)
    tokens = rng.integers(pad + 1, model_cfg.vocab_size, (2, length))
    types = rng.integers(0, model_cfg.type_vocab_size, (2, length))
    segments = np.ones((2, length), np.int32)
    segments[1, 13:] = 0
    tokens[1, 13:] = pad
    types[1, 13:] = 0
    return tokens, types, segments


def hf_mlm_logits(model, tokens, types, segments) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens), token_type_ids=torch.as_tensor(types),
                    attention_mask=torch.as_tensor(segments != 0, dtype=torch.long))
    return out.logits.double().numpy()


def jaxlm_mlm_logits(model_cfg, params, tokens, types, segments) -> np.ndarray:
    model_cfg = model_cfg.copy_and_resolve_references()
    model_cfg.remat = "none"
    graphdef, state = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jax.numpy.asarray(a, "float32"), params))
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    fwd = jax.jit(lambda s, *args: nnx.merge(graphdef, s)(*args),
                  compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(fwd(state, tokens, positions, segments, types), np.float64)


def assert_parity(logits, expected, segments):
    real = segments != 0
    assert float(np.std(expected[real])) > 0.5  # random weights: a nontrivial logit scale
    diff = parity.max_diff(logits[real], expected[real])
    assert diff <= parity.TOLERANCE, f"max |jaxlm - transformers| = {diff:.3g}"
    return diff


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(case, hf_saved, tmp_path):
    model, hf_dir = hf_saved(case)
    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    model_cfg, params = parity.restore_run(tmp_path / "run")
    assert model_cfg.family == "bert"
    assert model_cfg.position_offset == (2 if case == "roberta" else 0)
    # transformers counts the tied decoder once, as jaxlm has it once
    assert zoo.param_count(model_cfg) == sum(p.numel() for p in model.parameters())
    tokens, types, segments = batch(model_cfg, PAD[CASES[case][0]], seed=1)
    expected = hf_mlm_logits(model, tokens, types, segments)
    assert_parity(jaxlm_mlm_logits(model_cfg, params, tokens, types, segments), expected,
                  segments)
    if model_cfg.type_vocab_size > 1:  # the token types are read
        zeros = np.zeros_like(types)
        assert parity.max_diff(jaxlm_mlm_logits(model_cfg, params, tokens, zeros, segments),
                               expected) > 1e-2
    tok = tokenizers.load_saved(tmp_path / "run" / "tokenizer")
    assert tok.pad_id == PAD[CASES[case][0]]


def test_old_names_and_pretraining_extras_are_read_as_transformers_reads_them(
        hf_saved, tmp_path, hf_models_module):
    """A BertForPreTraining-style checkpoint (bert-base-uncased): LayerNorm gamma/beta, the
    next-sentence head, the pooler, the position-id buffer and the tied decoder saved too."""
    model, hf_dir = hf_saved("bert")
    old = tmp_path / "hf"
    old.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (old / name).write_bytes((hf_dir / name).read_bytes())
    original = st.read_header(hf_dir / st.SINGLE_FILE)
    d = SHAPES["hidden_size"]
    extras = {"cls.seq_relationship.weight": np.ones((2, d), np.float32),
              "cls.seq_relationship.bias": np.ones((2,), np.float32),
              "bert.pooler.dense.weight": np.ones((d, d), np.float32),
              "bert.pooler.dense.bias": np.ones((d,), np.float32),
              "bert.embeddings.position_ids": np.arange(40, dtype=np.int64)[None],
              "cls.predictions.decoder.weight": st.read_tensor(
                  original["bert.embeddings.word_embeddings.weight"]),
              "cls.predictions.decoder.bias": st.read_tensor(original["cls.predictions.bias"])}
    plans = [st.TensorPlan(n.replace("LayerNorm.weight", "LayerNorm.gamma")
                           .replace("LayerNorm.bias", "LayerNorm.beta"), info.shape,
                           st.read_tensor(info).dtype, lambda info=info: st.read_tensor(info))
             for n, info in original.items()]
    plans += [st.TensorPlan(n, a.shape, a.dtype, lambda a=a: a) for n, a in extras.items()]
    st.write_file(old / st.SINGLE_FILE, plans)
    assert "bert.embeddings.LayerNorm.gamma" in st.read_header(old / st.SINGLE_FILE)

    hf_import.import_hf(old, tmp_path / "run", log=lambda _: None)
    model_cfg, params = parity.restore_run(tmp_path / "run")
    tokens, types, segments = batch(model_cfg, PAD["bert"], seed=3)
    assert_parity(jaxlm_mlm_logits(model_cfg, params, tokens, types, segments),
                  hf_mlm_logits(model, tokens, types, segments), segments)


def write_run(run, model_cfg, seed, hf_models_module):
    """A jaxlm run of random parameters with jaxlm's byte tokenizer (pad 0, bos 1, eos 2)."""
    shapes, axes = params_lib.abstract_params(model_cfg)
    flat = hf_models_module.random_jaxlm_params({k: v.shape for k, v in shapes.items()}, seed)
    run.mkdir()
    params_lib.write_checkpoint(run, params_lib.run_config(model_cfg, run, "byte"), flat, axes,
                                "byte")
    tokenizers.ByteTokenizer().save(run / "tokenizer")
    return flat


def export_cfg(case, **overrides):
    """The jaxlm model config of an HF case (config.json alone, no weights)."""
    from jaxlm.convert import families

    model_type, config = CASES[case]
    cfg, _ = families.model_config({"model_type": model_type, **SHAPES, **config})
    cfg.update(overrides)
    return cfg


# BERT with the tanh GELU (exported as gelu_new) and RoBERTa with jaxlm's byte tokenizer
# (pad 0: positions from row 1).
EXPORTS = {"bert": ("bert", dict(activation="gelu_tanh")),
           "roberta": ("roberta", dict(position_offset=1, max_seq_len=41))}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_matches_transformers(case, tmp_path, hf_models_module):
    source, overrides = EXPORTS[case]
    model_cfg = export_cfg(source, **overrides)
    flat = write_run(tmp_path / "run", model_cfg, seed=5, hf_models_module=hf_models_module)
    assert cli.main(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert hf_export.auto_class(model_cfg.family) == "AutoModelForMaskedLM"
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True)
    assert type(model).__name__ == ("BertForMaskedLM" if case == "bert" else "RobertaForMaskedLM")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    byte_pad = tokenizers.ByteTokenizer().pad_id
    assert model.config.pad_token_id == byte_pad == model_cfg.position_offset - 1 or case == "bert"
    tokens, types, segments = batch(model_cfg, byte_pad, seed=6)
    expected = jaxlm_mlm_logits(model_cfg, params_lib.unflatten(flat), tokens, types, segments)
    assert_parity(hf_mlm_logits(model, tokens, types, segments), expected, segments)


def test_roberta_round_trip_is_exact(hf_saved, tmp_path):
    """RoBERTa (pad 1, positions from row 2) -> jaxlm -> RoBERTa: every tensor bit for bit,
    the same config, the same logits."""
    model, hf_dir = hf_saved("roberta")
    hf_import.import_hf(hf_dir, tmp_path / "run", log=lambda _: None)
    hf_export.export_hf(tmp_path / "run", tmp_path / "back", log=lambda _: None)
    original = st.read_headers(st.checkpoint_files(hf_dir))
    exported = st.read_headers(st.checkpoint_files(tmp_path / "back"))
    assert set(exported) == set(original)
    for name, info in original.items():
        np.testing.assert_array_equal(st.read_tensor(exported[name]), st.read_tensor(info),
                                      err_msg=name)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for key in ("model_type", "architectures", "pad_token_id", "max_position_embeddings",
                "type_vocab_size", "hidden_act", "layer_norm_eps", "tie_word_embeddings"):
        assert config[key] == source[key], key
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path / "back", dtype=torch.float32, attn_implementation="eager")
    model_cfg = hf_import.open_checkpoint(hf_dir).model_cfg
    tokens, types, segments = batch(model_cfg, PAD["roberta"], seed=7)
    np.testing.assert_array_equal(hf_mlm_logits(reloaded, tokens, types, segments),
                                  hf_mlm_logits(model, tokens, types, segments))


# ---- refusals: one line naming the key, nothing written ---------------------------------

def tiny_hf_dir(directory, hf_models_module, **config_changes):
    """A bert HF directory written by jaxlm's own writer (no torch), config.json edited."""
    cfg = hf_models_module.tiny_cfg("bert", n_kv_heads=4)
    hf_dir = hf_models_module.write_hf_dir(directory, cfg)
    hf_models_module.edit_config(hf_dir, **config_changes)
    return hf_dir


@pytest.mark.parametrize("changes,fragment", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(is_decoder=True), "is_decoder=true"),
    (dict(add_cross_attention=True), "add_cross_attention=true"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=false"),
    (dict(hidden_act="silu"), "hidden_act='silu'"),
    (dict(hidden_size=30), "hidden_size=30 is not divisible by num_attention_heads=4"),
    (dict(model_type="roberta", hidden_act="relu", pad_token_id=1), "hidden_act='relu'"),
    (dict(model_type="roberta", pad_token_id=None), "pad_token_id is null"),
    (dict(model_type="roberta", pad_token_id=63), "pad_token_id=63"),
])
def test_unsupported_config_is_one_line_naming_the_key(changes, fragment, tmp_path,
                                                       hf_models_module, capsys):
    hf_dir = tiny_hf_dir(tmp_path / "hf", hf_models_module, **changes)
    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "config.json" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["bare BertModel", "task model"])
def test_a_checkpoint_without_the_masked_lm_head_is_refused(kind, tmp_path, hf_models_module):
    hf_dir = tiny_hf_dir(tmp_path / "hf", hf_models_module)

    def change(name, array):
        if name.startswith("cls."):
            return {"classifier.weight": np.zeros((2, 32), np.float32)} \
                if kind == "task model" and name == "cls.predictions.bias" else {}
        return {name.removeprefix("bert.") if kind == "bare BertModel" else name: array}

    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE, change)
    with pytest.raises(hf_import.ConversionError) as e:
        hf_import.import_hf(hf_dir, tmp_path / "out", log=lambda _: None)
    message = str(e.value)
    assert "no masked-LM head (cls.predictions.transform.dense.weight is missing" in message
    assert ("bare BertModel" in message) == (kind == "bare BertModel")
    assert "\n" not in message and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,fragment", [
    (dict(head_dim=8), ("config.model.head_dim=8: Hugging Face BERT has head_dim = "
                        "hidden_size / num_attention_heads (36 / 3)")),
    (dict(position_offset=2), ("config.model.position_offset=2: RobertaForMaskedLM reads "
                               "position p from row pad_token_id + 1 + p, so the tokenizer's "
                               "pad id must be 1; it is 0")),
    (dict(position_offset=1, activation="relu"), ("config.model.activation='relu' with "
                                                  "position_offset=1 (RoBERTa) is not "
                                                  "exportable")),
])
def test_unexportable_models_are_refused(overrides, fragment, tmp_path, hf_models_module):
    write_run(tmp_path / "run", export_cfg("bert", **overrides), 0, hf_models_module)
    with pytest.raises(hf_import.ConversionError) as e:
        hf_export.export_hf(tmp_path / "run", tmp_path / "hf", log=lambda _: None)
    assert str(e.value).startswith(fragment) and "\n" not in str(e.value), str(e.value)
