"""Recovering a pruned model by distillation: the default model trained 600 steps is the
teacher; pruned to half its blocks, it trains 100 more steps against the teacher's
predictions (alpha 0.5, temperature 2), starting from the pruned weights.

    jaxlm train --config.train.steps=600 --workdir runs/teacher
    jaxlm prune --workdir runs/teacher --out runs/half --layers 2
    jaxlm train --config configs/distill_tiny.py --workdir runs/half-distilled
    jaxlm train --config configs/distill_tiny.py --config.distill.teacher= \
        --workdir runs/half-plain                      # the same steps without a teacher
    jaxlm bench compress --workdir runs/teacher \
        --runs pruned=runs/half,plain=runs/half-plain,distilled=runs/half-distilled

The README's "Pruning and distillation" section has the figures of this recipe.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    # configs/tiny.py's model with 2 of its 4 blocks: the pruned run's shape
    cfg.model.update(family="llama", d_model=256, n_layers=2, n_heads=4, n_kv_heads=4,
                     d_ff=704, vocab_size=0, max_seq_len=1024, dtype="float32", remat="none")
    cfg.data.update(seq_len=256, global_batch_size=16)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=30, schedule="cosine")
    cfg.train.update(steps=100, log_every=10)
    cfg.checkpoint.update(every=100, keep=2, init_from="runs/half")
    cfg.distill.update(teacher="runs/teacher", alpha=0.5, temperature=2.0)
    return cfg
