"""A fine-tuning run starts from a `jaxlm convert from-hf` directory as from a jaxlm run: the
model, tokenizer and parameters are the converted ones, and the run records its base."""

from __future__ import annotations

import random

import jax
import numpy as np
import pytest
from ft_helpers import TESTS, finetune, load_test_module, write_jsonl

from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.checkpoint import rundir
from jaxlm.finetune import tasks

hf_models = load_test_module("jaxlm_tests_convert_hf_models_ft",
                             TESTS / "convert" / "hf_models.py")
reference = load_test_module("jaxlm_tests_reference", TESTS / "model" / "reference.py")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from jaxlm.convert.hf_import import import_hf
    root = tmp_path_factory.mktemp("hf")
    hf_dir = hf_models.write_hf_dir(root / "hf")
    import_hf(hf_dir, root / "run", log=lambda *a: None)
    return root / "run"


def test_sft_lora_from_a_converted_hf_model(converted, make_cfg, tmp_path):
    # The word-level tokenizer of the converted model knows "w4".."w99".
    rng = random.Random(0)
    lines = [{"prompt": " ".join(f"w{rng.randint(4, 50)}" for _ in range(3)),
              "response": f"w{rng.randint(51, 99)}"} for _ in range(40)]
    train_file = write_jsonl(tmp_path / "sft.jsonl", lines)
    cfg = make_cfg("sft", "lora", train_file, steps=2, every=2,
                   finetune={"base": str(converted), "template": "plain"},
                   data={"seq_len": 16})
    logged = finetune(cfg, tmp_path / "run")
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]

    base = tasks.resolve_base(converted)
    assert base.tokenizer.name == "hf" and base.config.model.vocab_size == 128
    run_cfg, _ = rundir.saved_config(tmp_path / "run")
    assert run_cfg.finetune.base == str(base.step_dir)  # the exact base step is recorded
    assert run_cfg.model.to_dict() == {**base.config.model.to_dict(), "remat": "none"}
    # The eval loss before training is the converted model's own: a float64 NumPy forward
    # of the converted parameters on the same eval rows gives it.
    params = checkpoint_lib.restore_params(base.step_dir, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _abstract(base.config.model)))
    _, eval_rows = tasks.FinetuneTask(run_cfg).load_data()
    logits = reference.forward_packed(reference.to_float64(params), run_cfg.model,
                                      eval_rows["inputs"], eval_rows["positions"],
                                      eval_rows["segment_ids"])
    real = eval_rows["weights"] > 0
    picked = logits[real]
    log_z = np.log(np.exp(picked - picked.max(-1, keepdims=True)).sum(-1)) + picked.max(-1)
    loss = float(np.mean(log_z - picked[np.arange(len(picked)), eval_rows["targets"][real]]))
    first_eval = [m for m in logged if "eval_loss" in m][0]
    assert first_eval["step"] == 0 and first_eval["eval_loss"] == pytest.approx(loss, rel=1e-5)


def _abstract(model_cfg):
    from flax import nnx

    from jaxlm.model import zoo
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: zoo.create(model_cfg))))
