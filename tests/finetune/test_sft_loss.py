"""Packed SFT: the loss over examples packed several to a row equals the loss over the same
examples one per row, and both equal a float64 NumPy forward of each example alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ft_helpers import TESTS, load_test_module, sft_lines, write_jsonl

from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.finetune import records, sft_data, templates
from jaxlm.model import zoo
from jaxlm.train import lm

reference = load_test_module("jaxlm_tests_reference", TESTS / "model" / "reference.py")


def test_packed_sft_loss_equals_unpacked_and_float64_reference(base_run, tmp_path):
    _, params, model_cfg = base_run
    lines = sft_lines(14, seed=2) + [{"prompt": "a longer prompt here", "response": "and reply"}]
    recs = records.read_jsonl(write_jsonl(tmp_path / "s.jsonl", lines))
    examples, _ = sft_data.load_examples(recs, templates.BUILTIN["plain"], ByteTokenizer(), 64,
                                         "error")
    packed = sft_data.pack(examples, 64, packing=True)
    single = sft_data.pack(examples, 64, packing=False)
    assert len(packed["inputs"]) <= len(single["inputs"]) // 3  # several examples per row

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: zoo.create(model_cfg)))
    sums = jax.jit(lambda p, b: lm.loss_sums(graphdef, p, b, 0.0)[1])
    p = jax.tree.map(jnp.asarray, params)
    got_packed = jax.device_get(sums(p, packed))
    got_single = jax.device_get(sums(p, single))

    params64 = reference.to_float64(params)
    ref_ce, ref_tokens = 0.0, 0
    for ex in examples:  # each example alone, its loss on the trained targets only
        logits = reference.forward_document(params64, model_cfg, ex.ids[:-1])
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = log_z - logits[np.arange(len(ex.ids) - 1), ex.ids[1:]]
        ref_ce += float(nll[ex.mask[1:]].sum())
        ref_tokens += int(ex.mask[1:].sum())

    assert got_packed["weight_sum"] == got_single["weight_sum"] == ref_tokens
    np.testing.assert_allclose(got_packed["ce_sum"], got_single["ce_sum"], rtol=2e-6)
    np.testing.assert_allclose(got_packed["ce_sum"], ref_ce, rtol=1e-5)
