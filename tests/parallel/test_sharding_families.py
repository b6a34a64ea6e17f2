"""The encoder (bert, masked LM), encoder-decoder (t5, span corruption) and mixture-of-
experts (moe, causal LM with its routers' losses) families compute the same step sharded
over fsdp x tensor on 8 simulated devices as on one device: the step's loss and gradient
norm, and the gradients of the summed objective leaf by leaf. So does moe with its experts
split over the expert axis (tokens exchanged by all-to-all), with fsdp and with tensor."""

import functools

import pytest
from sharded_step import assert_same_step, step_on_mesh  # tests/sharded_step.py

from jaxlm import config as config_lib


def family_config(family):
    cfg = config_lib.defaults()
    cfg.model.update(family=family, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                     vocab_size=384, max_seq_len=64, remat="full")
    cfg.data.update(seq_len=32, global_batch_size=16)
    cfg.optim.update(warmup_steps=0, z_loss=1e-4, grad_accum_steps=2)
    cfg.train.steps = 10
    if family == "bert":
        cfg.objective.name = "masked_lm"
    elif family == "moe":
        cfg.model.update(n_experts=4, experts_per_token=2, d_expert=32, n_kv_heads=2)
    else:
        cfg.objective.update(name="span_corruption", targets_len=12)
        cfg.model.update(n_decoder_layers=3, head_dim=12, gated_mlp=True, activation="gelu_tanh",
                         tie_embeddings=False)
    return cfg


@functools.cache
def one_device(family):
    return step_on_mesh(family_config(family), {"data": 1, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize("family", ["bert", "t5", "moe"])
def test_sharded_step_equals_one_device(family):
    want = one_device(family)
    assert_same_step(step_on_mesh(family_config(family), {"data": 1, "fsdp": 4, "tensor": 2}),
                     want)


@pytest.mark.parametrize("mesh", [{"expert": 4, "fsdp": 2, "tensor": 1},
                                  {"expert": 2, "fsdp": 2, "tensor": 2}])
def test_expert_parallel_step_equals_one_device(mesh, monkeypatch):
    from jaxlm.model import moe

    exchanged = []

    def over_expert_axis(*args):
        exchanged.append(args[3].shape)  # the experts' weights, as the layer passes them
        return over(*args)

    over = moe.over_expert_axis
    monkeypatch.setattr(moe, "over_expert_axis", over_expert_axis)
    assert_same_step(step_on_mesh(family_config("moe"), mesh), one_device("moe"))
    assert exchanged and all(shape[0] == 4 for shape in exchanged)  # all 4 experts, split
