"""Golden values: the first two steps of every training task on fixed inputs, pinned.

Each case builds a tiny model from a fixed seed, initialises it the way `jaxlm train` and
`jaxlm finetune` do, and runs two real (jitted, sharded, donated) train steps on a fixed
random batch over the 8 simulated devices. The fingerprint of the initial trainable state
and the loss and gradient norm of both steps must equal the values below.

These are not reference values (the parity tests compare against float64 NumPy and Hugging
Face): they pin today's numerics, so a refactor that was meant to change nothing proves it
did not. If a change was *meant* to change the numerics (a new initialisation, another
reduction order), the failure prints the new values: check that the difference is the one
intended, paste them into GOLDEN and say why in the commit message.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from jaxlm import config as config_lib

# name -> (state fingerprint, [(loss, grad_norm) of step 1, of step 2])
GOLDEN = {
    'classify_lora': ('2188f9b18a7da146', [(1.0888965129852295, 1.9546829462051392),
                                            (0.8978387117385864, 1.833158254623413)]),
    'lm_gpt2': ('10117da6ff9a1f64', [(4.17656946182251, 1.3097277879714966),
                                      (3.9542951583862305, 1.3960524797439575)]),
    'lm_llama': ('1d114087bcb2f5e2', [(4.138375759124756, 0.7794041633605957),
                                       (3.8579261302948, 0.8731022477149963)]),
    'lm_llama_accum': ('57cd215a24e3160d', [(4.180371284484863, 0.7551180720329285),
                                             (3.9712400436401367, 0.777504563331604)]),
    'sft_full': ('590d2ad5b51cf5ad', [(4.186638355255127, 1.504313349723816),
                                       (3.951110601425171, 1.2830395698547363)]),
    'sft_lora': ('bf7609c8e04e236e', [(4.1797027587890625, 0.20683270692825317),
                                       (4.143311023712158, 0.22889551520347595)]),
}

CASES = {
    "lm_llama": dict(task="", family="llama", n_kv_heads=2, tie_embeddings=False,
                     qkv_bias=True, rope_scaling=dict(type="llama3", factor=8.0,
                                                      original_max_len=16)),
    "lm_gpt2": dict(task="", family="gpt2", n_kv_heads=4, tie_embeddings=False),
    "lm_llama_accum": dict(task="", family="llama", n_kv_heads=1, grad_accum=2,
                           devices=4),  # microbatches of 4 rows: 4 batch shards
    "sft_lora": dict(task="sft", method="lora", family="llama", n_kv_heads=2),
    "sft_full": dict(task="sft", method="full", family="gpt2", n_kv_heads=4),
    "classify_lora": dict(task="classify", method="lora", family="llama", n_kv_heads=2),
}


def case_config(case: dict) -> ml_collections.ConfigDict:
    cfg = config_lib.defaults()
    cfg.model.update(family=case["family"], d_model=32, n_layers=2, n_heads=4,
                     n_kv_heads=case["n_kv_heads"], d_ff=64, vocab_size=64, max_seq_len=32,
                     remat="none", tie_embeddings=case.get("tie_embeddings", True),
                     qkv_bias=case.get("qkv_bias", False))
    cfg.model.rope_scaling.update(case.get("rope_scaling", {}))
    cfg.data.update(seq_len=16, global_batch_size=8)
    cfg.optim.update(learning_rate=1e-2, warmup_steps=0, grad_accum_steps=case.get("grad_accum", 1))
    cfg.train.update(steps=4, seed=7)
    if case["task"]:
        cfg.finetune.update(task=case["task"], method=case["method"], base="unused",
                            train_file="unused", num_labels=3)
        cfg.model.remat = "none"
        cfg.finetune.lora.update(rank=4, alpha=8.0)
    return cfg


def batch(cfg: ml_collections.ConfigDict, task: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b, length = cfg.data.global_batch_size, cfg.data.seq_len
    tokens = rng.integers(3, cfg.model.vocab_size, size=(b, length + 1), dtype=np.int32)
    segments = np.ones((b, length), np.int32)
    segments[:, length // 2:] = 2  # two documents per row
    segments[0, -3:] = 0  # padding
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])
    out = {"inputs": tokens[:, :-1], "segment_ids": segments,
           "positions": np.broadcast_to(positions.astype(np.int32), (b, length)).copy()}
    if task == "classify":
        out["labels"] = rng.integers(0, 3, size=b).astype(np.int32)
        out["label_weights"] = np.ones(b, np.float32)
        return out
    weights = (segments > 0).astype(np.float32)
    if task == "sft":
        weights[:, :4] = 0.0  # a "prompt"
    out.update(targets=tokens[:, 1:], weights=weights)
    return out


def digest(tree) -> str:
    from jaxlm.checkpoint import fingerprint
    return fingerprint.digest(tree)


def run_case(case: dict) -> tuple[str, list[tuple[float, float]]]:
    """Builds the case's task as `jaxlm train` / `jaxlm finetune` do (a fine-tuning base is a
    random model written as a run directory), initialises it and runs two steps."""
    import tempfile

    from jaxlm.checkpoint import manager as checkpoint_lib
    from jaxlm.data.tokenizers import ByteTokenizer
    from jaxlm.finetune.tasks import FinetuneTask
    from jaxlm.model import zoo
    from jaxlm.parallel import mesh as mesh_lib
    from jaxlm.train.lm import CausalLM

    cfg = case_config(case)
    host = batch(cfg, case["task"])
    with tempfile.TemporaryDirectory() as tmp:
        if case["task"]:
            base_cfg = case_config(dict(case, task=""))
            params = jax.tree.map(np.asarray, nnx_params(zoo.create(base_cfg.model, seed=3)))
            ByteTokenizer().save(f"{tmp}/tokenizer")
            ckpt = checkpoint_lib.Checkpointer(tmp, base_cfg.checkpoint)
            ckpt.save(1, {"step": np.asarray(1, np.int32), "params": params}, {},
                      checkpoint_lib.run_metadata(base_cfg, {}, "byte"))
            ckpt.wait()
            ckpt.close()
            cfg.finetune.base = tmp
            task = FinetuneTask(cfg)
        else:
            task = CausalLM(cfg, num_devices=case.get("devices", jax.device_count()))
        mesh = mesh_lib.make_mesh(task.cfg.mesh,
                                  jax.devices()[:case.get("devices", jax.device_count())])
        with mesh_lib.use(mesh):
            task.build(mesh)
            state = task.init_state()
            # Pretraining's parameters, fine-tuning's trainable groups.
            fingerprint = digest(state["params"] if not case["task"] else
                                 {g: state[g] for g in task.spec.groups})
            global_batch = {k: jax.device_put(v, s)
                            for (k, v), s in zip(host.items(),
                                                 (task.batch_shardings()[k] for k in host))}
            steps = []
            for _ in range(2):
                state, metrics = task.train_step(state, task.frozen, global_batch)
                steps.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return fingerprint, steps


def nnx_params(model):
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(model))


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_values(name):
    fingerprint, steps = run_case(CASES[name])
    new = f"{name!r}: ({fingerprint!r}, {[(float(a), float(b)) for a, b in steps]!r}),"
    assert name in GOLDEN, f"no golden values for {name}; if intended, add:\n{new}"
    want_fingerprint, want_steps = GOLDEN[name]
    assert fingerprint == want_fingerprint, f"initial state changed; now:\n{new}"
    np.testing.assert_allclose(np.asarray(steps), np.asarray(want_steps), rtol=1e-6,
                               err_msg=f"step metrics changed; now:\n{new}")
