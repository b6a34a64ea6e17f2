"""Classification fine-tuning of the default pretraining run: which kind of Python
statement a line is (import, function, loop, assignment), from
jaxlm/finetune/data/classify_tiny.jsonl; a head on the last token's hidden state, LoRA
adapters on the body.

    jaxlm train                                         # the base: runs/tiny
    jaxlm finetune --config configs/classify_tiny.py    # -> runs/classify_tiny
    jaxlm classify --workdir runs/classify_tiny --text "import os" --text "for x in y:"

Expect on a 2-core CPU: about 0.3 s per step, under a minute; held-out accuracy from 0.27
(chance: 0.25) to 0.96 at step 20 and 1.00 at step 40, with eval_loss and eval_accuracy in
runs/classify_tiny/metrics.jsonl. Full fine-tuning: `--config.finetune.method=full`.
"""

from jaxlm.config import defaults
from jaxlm.finetune.examples import data_path


def get_config():
    cfg = defaults()
    cfg.finetune.update(task="classify", method="lora", base="runs/tiny",
                        train_file=data_path("classify_tiny.jsonl"), eval_fraction=0.1,
                        label_names="import,function,loop,assignment",
                        pooling="last")
    cfg.finetune.lora.update(rank=8, alpha=16.0, dropout=0.0, targets="q,v,mlp")
    cfg.model.update(remat="none")
    cfg.data.update(seq_len=64, global_batch_size=32)
    cfg.optim.update(learning_rate=3e-3, warmup_steps=5, schedule="cosine", weight_decay=0.0)
    cfg.train.update(steps=60, log_every=10, eval_every=20)
    cfg.checkpoint.update(every=0, keep=1)
    return cfg
