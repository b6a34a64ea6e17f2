"""T5 logit parity with Hugging Face transformers, both directions, max |diff| <= 1e-4
(float32), and the t5 mapping's config.json reading.

HF -> jaxlm: a tiny random T5ForConditionalGeneration (odd shapes: H x d_kv != d_model, more
decoder than encoder layers, few relative buckets so distant positions share log buckets)
is saved with save_pretrained, converted with `jaxlm convert from-hf`, restored through
jaxlm's checkpoint code and run by jaxlm on padded encoder inputs. Cases: v1.0 (ReLU, tied
and rescaled head), v1.1 as transformers 4 saved it (gated GELU, tie_word_embeddings false,
its own lm_head.weight), v1.1 as transformers 5 saves it (no lm_head.weight: the head is the
shared embedding, unscaled), mT5.
jaxlm -> HF: random jaxlm parameters are saved as a run, exported with `to-hf` and loaded
with AutoModelForSeq2SeqLM.from_pretrained.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import cli
from jaxlm.convert import families, hf_export, hf_import
from jaxlm.convert import params as params_lib
from jaxlm.convert import safetensors_io as st
from jaxlm.convert.spec import HFConfigError
from jaxlm.data import tokenizers
from jaxlm.model import zoo

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "jaxlm_tests_convert_test_parity", pathlib.Path(__file__).with_name("test_parity.py"))
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

TOLERANCE = 1e-4
VOCAB = 128
BASE = dict(vocab_size=VOCAB, d_model=24, d_kv=7, d_ff=40, num_layers=2, num_decoder_layers=3,
            num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
            layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)
CASES = {  # name -> (config class, overrides, the head: "tied" | "saved" | "shared")
    "v1_0_relu_tied": ("T5Config", dict(feed_forward_proj="relu"), "tied"),
    "v1_1_gated_untied": ("T5Config", dict(feed_forward_proj="gated-gelu",
                                           tie_word_embeddings=False), "saved"),
    "v1_1_transformers5": ("T5Config", dict(feed_forward_proj="gated-gelu",
                                            tie_word_embeddings=False), "shared"),
    "mt5_gated_relu": ("MT5Config", dict(feed_forward_proj="gated-relu", num_decoder_layers=1),
                       "saved"),
}


def build_hf(case, seed):
    """A float32 eval-mode model of CASES[case], weights far from HF's init: norm scales
    1 +- 0.3, projections std 0.16, embedding, head and position biases std 1."""
    config_class, overrides, head = CASES[case]
    config = getattr(transformers, config_class)(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).float().eval()
    if head == "saved":  # its own head, as transformers 4 kept an untied one
        model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, BASE["d_model"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            elif "shared" in name or "lm_head" in name or "relative_attention_bias" in name:
                p.copy_(noise)
            else:
                p.copy_(0.16 * noise)
    return model


def save_hf(model, directory, hf_models_module):
    hf_models_module.save_hf(model, directory)
    names = set(st.read_headers(st.checkpoint_files(directory)))
    return directory, names


@pytest.fixture(scope="module")
def t5_saved(tmp_path_factory, hf_models_module):
    built = {}

    def get(case):
        if case not in built:
            model = build_hf(case, seed=len(case))
            built[case] = (model, *save_hf(model, tmp_path_factory.mktemp(case),
                                           hf_models_module))
        return built[case]
    return get


def inputs(seed=0):
    """Encoder ids with padding (row 1: 7 real tokens of 13) and decoder ids starting from
    the start id 0: positions up to 12 apart, beyond relative_attention_max_distance / 2."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, VOCAB, (2, 13)).astype(np.int32)
    mask = np.ones((2, 13), np.int32)
    mask[1, 7:] = 0
    enc[1, 7:] = 0
    dec = rng.integers(2, VOCAB, (2, 10)).astype(np.int32)
    dec[:, 0] = 0
    return enc, mask, dec


def hf_logits(model, enc, mask, dec):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(enc, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    decoder_input_ids=torch.as_tensor(dec, dtype=torch.long))
    return out.logits.double().numpy()


def jaxlm_logits(model_cfg, params, enc, mask, dec):
    """jaxlm's T5 with `params` (nested dict): the padding is encoder segment id 0."""
    model_cfg = model_cfg.copy_and_resolve_references()
    model_cfg.remat = "none"
    graphdef, state = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
    fwd = jax.jit(lambda s, x, m, y: nnx.merge(graphdef, s)(x, y, input_segment_ids=m),
                  compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(fwd(state, enc, mask, dec), np.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(case, t5_saved, tmp_path):
    model, hf_dir, names = t5_saved(case)
    head = CASES[case][2]
    assert ("lm_head.weight" in names) == (head == "saved")
    summary = hf_import.import_hf(hf_dir, tmp_path / "run", log=lambda _: None)
    model_cfg, params = parity.restore_run(tmp_path / "run")
    assert model_cfg.family == "t5" and model_cfg.tie_embeddings == (head == "tied")
    assert (model_cfg.n_layers, zoo.decoder_layers(model_cfg)) == (
        model.config.num_layers, model.config.num_decoder_layers)
    unique = {id(p): p for p in model.parameters()}  # lm_head shares shared's tensor when tied
    extra = VOCAB * BASE["d_model"] if head == "shared" else 0  # the head's own copy
    assert summary["param_count"] == sum(p.numel() for p in unique.values()) + extra
    assert summary["param_count"] == zoo.param_count(model_cfg)
    assert "decoder_start_token_id=0" in summary["notes"][0]
    enc, mask, dec = inputs()
    expected = hf_logits(model, enc, mask, dec)
    logits = jaxlm_logits(model_cfg, params, enc, mask, dec)
    assert float(np.std(expected)) > 0.5  # a nontrivial logit scale
    assert parity.max_diff(logits, expected) <= TOLERANCE
    # the padding matters: without the encoder mask the logits differ
    assert parity.max_diff(jaxlm_logits(model_cfg, params, enc, np.ones_like(mask), dec),
                           expected) > 1e-2


@pytest.mark.parametrize("case", ["v1_0_relu_tied", "v1_1_gated_untied"])
def test_export_matches_transformers(case, t5_saved, hf_models_module, tmp_path):
    _, hf_dir, _ = t5_saved(case)
    model_cfg = hf_import.open_checkpoint(hf_dir).model_cfg  # the architecture only
    shapes, axes = params_lib.abstract_params(model_cfg)
    flat = hf_models_module.random_jaxlm_params({k: v.shape for k, v in shapes.items()}, seed=5)
    for name in ("embed", "lm_head", "encoder_rel_bias", "decoder_rel_bias"):
        if name in flat:
            flat[name] = flat[name] / 0.16  # std 1, as build_hf
    run = tmp_path / "run"
    run.mkdir()
    cfg = params_lib.run_config(model_cfg, run, "byte")
    assert cfg.objective.name == "span_corruption"
    params_lib.write_checkpoint(run, cfg, flat, axes, "byte")
    tokenizers.ByteTokenizer().save(run / "tokenizer")

    summary = hf_export.export_hf(run, tmp_path / "hf", log=lambda _: None)
    assert summary["auto_class"] == "AutoModelForSeq2SeqLM"
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    assert type(model).__name__ == "T5ForConditionalGeneration"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_layers"], config["num_decoder_layers"], config["d_kv"]) == (2, 3, 7)
    assert config["decoder_start_token_id"] == 0 and config["model_type"] == "t5"
    enc, mask, dec = inputs(seed=1)
    expected = jaxlm_logits(model_cfg, params_lib.unflatten(flat), enc, mask, dec)
    assert float(np.std(expected)) > 0.5
    assert parity.max_diff(hf_logits(model, enc, mask, dec), expected) <= TOLERANCE


def test_command_line_round_trip(t5_saved, tmp_path):
    """from-hf then to-hf through the CLI: every tensor of the untied v1.1 model back."""
    _, hf_dir, names = t5_saved("v1_1_gated_untied")
    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    assert cli.main(["convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    original = st.read_headers(st.checkpoint_files(hf_dir))
    exported = st.read_headers(st.checkpoint_files(tmp_path / "back"))
    assert set(exported) == set(original) == names
    for name, info in original.items():
        np.testing.assert_array_equal(st.read_tensor(exported[name]), st.read_tensor(info),
                                      err_msg=name)


# ---- config.json ---------------------------------------------------------------------------

T5_CONFIG = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
             "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
             "num_heads": 8, "feed_forward_proj": "relu", "decoder_start_token_id": 0}


def test_config_defaults_and_layouts():
    cfg, notes = families.model_config(T5_CONFIG)  # t5-small: v1.0, tied, old keys absent
    assert (cfg.n_layers, zoo.decoder_layers(cfg), cfg.head_dim, cfg.relative_buckets,
            cfg.relative_max_distance, cfg.norm_eps) == (6, 6, 64, 32, 128, 1e-6)
    assert (cfg.activation, cfg.gated_mlp, cfg.tie_embeddings) == ("relu", False, True)
    assert notes == ["decoder_start_token_id=0: generation starts the decoder from this id"]
    flan = {**T5_CONFIG, "feed_forward_proj": "gated-gelu", "num_decoder_layers": None,
            "tie_word_embeddings": False}
    cfg, _ = families.model_config(flan)
    assert (cfg.activation, cfg.gated_mlp, cfg.tie_embeddings) == ("gelu_tanh", True, False)
    assert zoo.decoder_layers(cfg) == 6
    # transformers 5 writes tie_word_embeddings true and says the head is unscaled
    cfg, _ = families.model_config({**flan, "tie_word_embeddings": True,
                                    "scale_decoder_outputs": False, "dense_act_fn": "gelu_new",
                                    "is_gated_act": True})
    assert not cfg.tie_embeddings
    cfg, _ = families.model_config({**T5_CONFIG, "model_type": "mt5",
                                    "feed_forward_proj": "gelu"})  # mt5 never rescales
    assert (cfg.activation, cfg.gated_mlp, cfg.tie_embeddings) == ("gelu", False, False)
    back = families.hf_config(cfg, "float32", {"pad_id": 0, "eos_id": 1})
    again, _ = families.model_config(json.loads(json.dumps(back)))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("change,fragment", [
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu' is not supported"),
    ({"feed_forward_proj": "gelu-gated-x"}, "feed_forward_proj='gelu-gated-x' is not"),
    ({"is_encoder_decoder": False}, "is_encoder_decoder=false"),
    ({"dense_act_fn": "gelu_new"}, "dense_act_fn='gelu_new' disagrees"),
    ({"is_gated_act": True}, "is_gated_act disagrees"),
    ({"relative_attention_num_buckets": 3}, "relative_attention_num_buckets=3"),
    ({"relative_attention_max_distance": 16}, "relative_attention_max_distance=16"),
    ({"num_layers": None}, "num_layers is null"),
    ({"d_kv": 0}, "d_kv=0"),
])
def test_bad_config_names_the_key(change, fragment):
    with pytest.raises(HFConfigError) as e:
        families.model_config({**T5_CONFIG, **change}, "config.json")
    assert fragment in str(e.value) and str(e.value).startswith("config.json: ")


def test_stacks_expand_to_their_own_depths(hf_models_module, tmp_path):
    """Encoder and decoder layers are checked per stack: a decoder layer beyond
    num_decoder_layers is an unknown tensor, a missing one is named (no torch needed)."""
    cfg = hf_models_module.tiny_cfg("t5", n_layers=1, n_decoder_layers=2, n_kv_heads=4,
                                    gated_mlp=True, activation="gelu_tanh")
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf", cfg)
    ckpt = hf_import.open_checkpoint(hf_dir)
    layered = [n for n in ckpt.plan if ".block." in n]
    assert {n.split(".block.")[1][0] for n in layered if n.startswith("encoder.")} == {"0"}
    assert {n.split(".block.")[1][0] for n in layered if n.startswith("decoder.")} == {"0", "1"}
    assert ckpt.depths == {"encoder_blocks": 1, "decoder_blocks": 2}

    hf_models_module.edit_config(hf_dir, num_decoder_layers=1)
    with pytest.raises(hf_import.ConversionError, match=r"tensor 'decoder\.block\.1\..*' in "
                       r"model.safetensors is not part of the model config.json describes: "
                       r".*decoder_blocks 1, encoder_blocks 1 layers"):
        hf_import.open_checkpoint(hf_dir)
    hf_models_module.edit_config(hf_dir, num_decoder_layers=3)
    with pytest.raises(hf_import.ConversionError, match=r"tensor 'decoder\.block\.2\..*' is "
                       r"missing"):
        hf_import.open_checkpoint(hf_dir)
