"""A LLaMA-3.2-1B-shaped model (1.24B parameters): 16 layers, d_model 2048, 32 heads with 8
key/value heads, SwiGLU 8192, vocabulary 128,256, rope theta 500,000, tied embeddings,
bfloat16 compute, sequence 2048.

    jaxlm train --config configs/llama_1b.py --workdir runs/llama_1b

Targets one 8-chip GPU host or a TPU v5p-8 slice with FSDP over all chips.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="llama", d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     d_ff=8192, vocab_size=128256, max_seq_len=8192, rope_theta=500_000.0,
                     tie_embeddings=True, dtype="bfloat16", remat="save_matmuls")
    cfg.data.update(seq_len=2048, global_batch_size=256)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.1)
    cfg.train.update(steps=100_000, log_every=50)
    cfg.checkpoint.update(every=1000, keep=3)
    return cfg
