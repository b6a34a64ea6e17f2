"""CPU benchmark shape: d_model 512, 8 layers, 8 heads, SwiGLU 1408, bytes, sequence 256,
global batch 8, float32, full remat (25.9M parameters).

    jaxlm bench step --config configs/bench_cpu.py

Prints tokens/s, step time, model FLOP/s and this host's measured float32 matmul FLOP/s;
the figures measured on a 2-core machine are in the README.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="llama", d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                     d_ff=1408, vocab_size=384, max_seq_len=256, dtype="float32", remat="full")
    cfg.data.update(seq_len=256, global_batch_size=8)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    cfg.train.update(steps=20, log_every=5)
    cfg.checkpoint.update(every=0)
    return cfg
