"""A small mixture-of-experts model (family moe) on the standard-library corpus, bytes: the
default run's shape (d_model 256, 4 layers) with each MLP replaced by 8 SwiGLU experts of
width 176 (a quarter of tiny.py's d_ff 704) behind a top-2 router: 2.3x tiny.py's MLP
parameters, half its MLP work per token (2 x 176 of 704 hidden units).

    jaxlm train --config configs/moe_tiny.py             # -> runs/moe_tiny

The metrics carry the routing health: moe_aux_loss (1 x k = 2 at perfect balance),
moe_z_loss, moe_load_0..7 (each expert's share of the assignments) and moe_load_max.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="moe", d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                     d_ff=704, n_experts=8, experts_per_token=2, d_expert=176,
                     vocab_size=0, max_seq_len=1024, dtype="float32", remat="none")
    cfg.data.update(seq_len=256, global_batch_size=16)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=30, schedule="cosine")
    cfg.train.update(steps=200, log_every=10)
    cfg.checkpoint.update(every=100, keep=2)
    return cfg
