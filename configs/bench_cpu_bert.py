"""CPU benchmark shape for the encoder family: BERT at bench_cpu's width and depth. d_model
512, 8 layers, 8 heads of 64, GELU MLP 2048 (BERT's 4 x d_model), bytes (384 embedding rows),
sequence 256, global batch 8, float32, masked-LM objective (25.8M parameters); remat
save_matmuls (matmul outputs kept, the rest recomputed: on the 2-core machine 57% MFU
against 48-50% with full remat and 48% with none, README Performance).

    jaxlm bench step --config configs/bench_cpu_bert.py

Prints tokens/s, step time, model FLOP/s (jaxlm.model.zoo.flops_per_token: every weight
matmul and the full, non-causal attention, the masked-LM head over every position as the
model computes it) and this host's measured float32 matmul FLOP/s; the figures measured on a
2-core machine are in the README.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="bert", d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                     d_ff=2048, vocab_size=384, max_seq_len=256, type_vocab_size=2,
                     activation="gelu", norm_eps=1e-12, dtype="float32", remat="save_matmuls")
    cfg.objective.update(name="masked_lm", mask_rate=0.15)
    cfg.data.update(seq_len=256, global_batch_size=8)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    cfg.train.update(steps=20, log_every=5)
    cfg.checkpoint.update(every=0)
    return cfg
