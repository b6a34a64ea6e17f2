"""CPU benchmark shape of family moe: bench_cpu.py's (d_model 512, 8 layers, 8 heads,
bytes, sequence 256, global batch 8, float32, full remat) with each MLP a mixture of 8
SwiGLU experts of width 704 behind a top-2 router: the same active MLP parameters per token
as bench_cpu.py's 1408-wide MLP (2 x 704), 4x its MLP parameters.

    jaxlm bench step --config configs/bench_cpu_moe.py
    jaxlm bench step --config configs/bench_cpu_moe.py --config.model.moe_dispatch=dense

The second is the dense masked reference (every expert on every token); the figures measured
on a 2-core machine are in the README.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="moe", d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                     d_ff=1408, n_experts=8, experts_per_token=2, d_expert=704,
                     vocab_size=384, max_seq_len=256, dtype="float32", remat="full")
    cfg.data.update(seq_len=256, global_batch_size=8)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    cfg.train.update(steps=20, log_every=5)
    cfg.checkpoint.update(every=0)
    return cfg
