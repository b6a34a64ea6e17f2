"""Mixtral-8x7B shape (46.7B parameters, 12.9B active per token): 32 layers, d_model 4096,
32 heads with 8 key/value heads, each MLP a mixture of 8 SwiGLU experts of width 14,336
behind a top-2 router (weights renormalised over the two), vocabulary 32,000, rope theta
1e6, untied embeddings, bfloat16 compute, sequence 4096, full remat.

    jaxlm train --config configs/mixtral_8x7b.py --workdir gs://BUCKET/runs/mixtral_8x7b

Targets a TPU v5p-128 slice (mesh.topology; 64 chips, a 4x4x4 cube): the experts split
over an expert axis of 4 (one physical axis of the cube: each chip holds 2 of every layer's
8 experts; tokens reach their experts by all-to-all), FSDP over the other 16. Checked from any host (needs the `tpu`
extra); the per-chip memory it prints is in the README ("Mixture of experts"):

    jaxlm compile --config configs/mixtral_8x7b.py

Weights from Hugging Face: `jaxlm convert from-hf path/to/Mixtral-8x7B-v0.1 --out DIR`
gives this model (its config.py); fine-tune with --config DIR/config.py and this file's mesh.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="moe", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     d_ff=14336, n_experts=8, experts_per_token=2, router_norm_topk=True,
                     vocab_size=32000, max_seq_len=32768, rope_theta=1_000_000.0,
                     tie_embeddings=False, dtype="bfloat16", remat="full")
    cfg.data.update(seq_len=4096, global_batch_size=256)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, expert=4, topology="v5p-128")
    cfg.optim.update(learning_rate=1e-4, warmup_steps=2000, min_lr_ratio=0.1)
    cfg.train.update(steps=100_000, log_every=50)
    cfg.checkpoint.update(every=500, keep=3)
    return cfg
