"""Recovering a pruned model by distillation: the default model trained 600 steps is the
teacher; pruned to half its blocks, it trains 100 more steps against the teacher's
predictions (alpha 0.5, temperature 2), starting from the pruned weights.

    jaxlm train --config.train.steps=600 --workdir runs/teacher
    jaxlm prune --workdir runs/teacher --out runs/half --layers 2
    jaxlm train --config configs/distill_tiny.py --workdir runs/half-distilled
    jaxlm train --config configs/distill_tiny.py --config.distill.teacher= \
        --workdir runs/half-plain                      # the same steps without a teacher
    jaxlm distill cache --config configs/distill_tiny.py --out runs/teacher-top64 \
        --top-k 64                                     # offline: the teacher's top 64, once
    jaxlm train --config configs/distill_tiny.py \
        --config.distill.cache=runs/teacher-top64 --workdir runs/half-offline
    jaxlm bench compress --workdir runs/teacher --runs pruned=runs/half,plain=runs/half-plain,\
distilled=runs/half-distilled,offline=runs/half-offline

The README's "Pruning and distillation" section has the figures of this recipe.
"""

import pathlib

from jaxlm.config import load_config_file


def get_config():
    # The teacher's config (configs/tiny.py) with 2 of its 4 blocks: the pruned run's shape.
    cfg = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    cfg.model.n_layers = 2
    cfg.train.update(steps=100, log_every=10)
    cfg.checkpoint.update(every=100, keep=2, init_from="runs/half")
    cfg.distill.update(teacher="runs/teacher", alpha=0.5, temperature=2.0)
    return cfg
