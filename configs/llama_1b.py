"""A LLaMA-3.2-1B-shaped model (1.24B parameters): 16 layers, d_model 2048, 32 heads with 8
key/value heads, SwiGLU 8192, vocabulary 128,256, rope theta 500,000, tied embeddings,
bfloat16 compute, sequence 2048.

    jaxlm train --config configs/llama_1b.py --workdir runs/llama_1b

Targets one 8-chip GPU host or a TPU v5p-8 slice (4 chips, mesh.topology) with FSDP over all
chips. A step of 524k tokens is 4 accumulated microbatches: in one piece it needs 161 GiB
per v5p chip (its 131k tokens' logits alone, 128k wide in float32, take 64 GiB). Checked from
any host (needs the `tpu` extra):

    jaxlm compile --config configs/llama_1b.py

prints per chip: arguments 3.46 GiB, temporaries 62.13 GiB, total 65.63 of 95.74 GiB
usable HBM (fits), and 4.47 s per step at 50% MFU.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="llama", d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     d_ff=8192, vocab_size=128256, max_seq_len=8192, rope_theta=500_000.0,
                     tie_embeddings=True, dtype="bfloat16", remat="save_matmuls")
    cfg.data.update(seq_len=2048, global_batch_size=256)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, topology="v5p-8")
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.1, grad_accum_steps=2)
    cfg.train.update(steps=100_000, log_every=50)
    cfg.checkpoint.update(every=1000, keep=3)
    return cfg
