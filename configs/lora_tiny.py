"""LoRA fine-tuning of the default pretraining run on the SFT data of configs/sft_tiny.py:
rank-8 adapters on q, k, v, o and the MLP; the base stays frozen and the checkpoints hold
only the adapters (and their optimizer state).

    jaxlm train                                         # the base: runs/tiny
    jaxlm finetune --config configs/lora_tiny.py        # -> runs/lora_tiny
    jaxlm generate --workdir runs/lora_tiny --max-new-tokens 16 \
        --prompt $'<|user|>\nWhat is the type of None?\n<|assistant|>\n'
    jaxlm lora merge runs/lora_tiny --out runs/lora_tiny-merged   # for export; optional

Expect on a 2-core CPU: about 1 s per step, 3 minutes; 157,696 trained parameters (4.8% of
the base's 3.3M); held-out loss from 4.30 to 0.72 at step 50, 0.30 at 100 and 0.19 at 150.
The adapted model (read directly, or merged) answers the type questions ("NoneType"); the
identifier task ("Uppercase: parser_key") needs full fine-tuning (configs/sft_tiny.py) or
more steps. Checkpoints are 2.0 MB, against 39 MB for sft_tiny's.
"""

from jaxlm.config import defaults
from jaxlm.finetune.examples import data_path


def get_config():
    cfg = defaults()
    cfg.finetune.update(task="sft", method="lora", base="runs/tiny",
                        train_file=data_path("sft_tiny.jsonl"), eval_fraction=0.1,
                        template="default", packing=True)
    cfg.finetune.lora.update(rank=8, alpha=16.0, dropout=0.05, targets="q,k,v,o,mlp")
    cfg.model.update(remat="none")
    cfg.data.update(seq_len=256, global_batch_size=16)
    cfg.optim.update(learning_rate=1e-2, warmup_steps=10, schedule="cosine", weight_decay=0.0)
    cfg.train.update(steps=150, log_every=10, eval_every=50)
    cfg.checkpoint.update(every=50, keep=2)
    return cfg
