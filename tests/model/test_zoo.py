"""The model zoo's registry: every family is listed with what the rest of jaxlm needs of it,
and an unknown family is one clear error before anything is built."""

import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.config import finetune as finetune_section
from jaxlm.convert import families as hf_families
from jaxlm.model import decoder, zoo

MODEL_DIR = pathlib.Path(zoo.__file__).parent
REPO = pathlib.Path(__file__).parents[2]


def test_the_registry_lists_every_family_module():
    """Each family's network lives in a module of jaxlm/model named after it, and each
    registered family builds that network."""
    assert set(zoo.FAMILIES) == {"llama", "moe", "gpt2", "bert", "t5"}
    for name, family in zoo.FAMILIES.items():
        assert family.name == name and family.describe
        assert family.network.startswith(f"jaxlm.model.{name}:")
        assert (MODEL_DIR / f"{name}.py").is_file()
        assert issubclass(family.network_class(), decoder.DecoderLM) == (family.kind == "decoder")


@pytest.mark.parametrize("name", sorted(zoo.FAMILIES))
def test_each_family_has_every_part(name):
    """Analytic counts match the built model; LoRA can adapt every target the config knows;
    the Hugging Face mapping exists."""
    cfg = config_lib.defaults().model
    cfg.update(family=name, vocab_size=96, d_model=32, n_heads=4, n_kv_heads=4, d_ff=48,
               max_seq_len=16, n_layers=2)
    if name == "moe":
        cfg.update(n_experts=4, d_expert=24, d_shared=16, shared_gate=True)
    zoo.validate(cfg)
    model = zoo.abstract(cfg)
    assert zoo.param_count(cfg) == sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    family = zoo.family(name)
    # Every LoRA target of the config; an encoder-decoder's MLP differs between its v1.0 and
    # gated shapes, and moe's are experts, so t5 and moe adapt the attention projections only.
    expected = set(finetune_section.LORA_TARGETS) - ({"mlp"} if name in ("t5", "moe") else set())
    assert set(family.lora_targets) == expected
    stacks = [getattr(model, s) for s in ("blocks", "encoder_blocks", "decoder_blocks")
              if hasattr(model, s)]
    assert len(stacks) == (2 if family.kind == "encoder_decoder" else 1)
    for projections in family.lora_targets.values():
        for sub, weight, inputs in projections:
            assert all(hasattr(getattr(stack, sub), weight) for stack in stacks) and inputs >= 1
    assert name in hf_families.MAPPINGS


def test_unknown_family_is_one_clear_error():
    cfg = config_lib.defaults().model
    cfg.family = "mamba"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.family: 'mamba' is not a "
                                                     r"model family; choose one of llama, moe, "
                                                     r"gpt2, bert, t5"):
        zoo.validate(cfg)
    with pytest.raises(config_lib.ConfigError, match="config.model.family"):
        zoo.create(cfg)
    result = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train",
                             "--config.model.family=mamba"], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "jaxlm: config.model.family: 'mamba' is not a model family; choose one of llama, "
        "moe, gpt2, bert, t5"]
