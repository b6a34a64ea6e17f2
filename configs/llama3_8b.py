"""Llama-3-8B shape (8.03B parameters): 32 layers, d_model 4096, 32 heads with 8 key/value
heads, SwiGLU 14,336, vocabulary 128,256, rope theta 500,000, untied embeddings, bfloat16
compute, sequence 8192, full remat.

    jaxlm train --config configs/llama3_8b.py --workdir gs://BUCKET/runs/llama3_8b

Targets a TPU v5p-128 slice (mesh.topology; 64 chips, 128 TensorCores): FSDP over the 64
chips, no tensor parallelism. Checked from any host (needs the `tpu` extra):

    jaxlm compile --config configs/llama3_8b.py

prints per chip: arguments 1.41 GiB, temporaries 22.49 GiB, total 23.94 of 95.74 GiB
usable HBM (fits), and 7.35 s per step (2.1M tokens) at 50% MFU. Attention is splash
(model.attention auto on TPU); with --config.model.attention=xla, which materialises every
layer's score matrices, the total is 59.64 GiB. Two such slices, data parallel across them
over DCN (--config.mesh.dcn_data=2 --config.data.global_batch_size=512): total 25.67 GiB per
chip (fits), the same 7.35 s per step for twice the tokens.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="llama", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                     d_ff=14336, vocab_size=128256, max_seq_len=8192, rope_theta=500_000.0,
                     tie_embeddings=False, dtype="bfloat16", remat="full")
    cfg.data.update(seq_len=8192, global_batch_size=256)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, topology="v5p-128")
    cfg.optim.update(learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.1)
    cfg.train.update(steps=100_000, log_every=50)
    cfg.checkpoint.update(every=500, keep=3)
    return cfg
