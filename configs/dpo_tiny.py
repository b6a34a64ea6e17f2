"""Preference tuning (DPO, rank-8 LoRA) of the SFT walkthrough's model on a small synthetic
preference set shipped with jaxlm (jaxlm/finetune/data/dpo_tiny.jsonl: for sft_tiny's
questions, a reply that answers is chosen over one that refuses or echoes the identifier).

    jaxlm train                                         # the base: runs/tiny
    jaxlm finetune --config configs/sft_tiny.py         # SFT: runs/sft_tiny
    jaxlm finetune --config configs/dpo_tiny.py         # -> runs/dpo_tiny
    jaxlm generate --workdir runs/dpo_tiny --max-new-tokens 16 \\
        --prompt $'<|user|>\\nWhat is the type of 3.5?\\n<|assistant|>\\n'

The reference model is the SFT run itself: the LoRA base, read without its adapters, so
there is no second copy of the weights. ORPO instead: --config.finetune.orpo=true (no
reference; beta weighs the odds-ratio term). Figures measured on the 2-core CPU are in the
README (Preference tuning).
"""

from jaxlm.config import defaults
from jaxlm.finetune.examples import data_path


def get_config():
    cfg = defaults()
    cfg.finetune.update(task="dpo", method="lora", base="runs/sft_tiny",
                        train_file=data_path("dpo_tiny.jsonl"), eval_fraction=0.1,
                        template="default", dpo_beta=0.1)
    cfg.finetune.lora.update(rank=8, alpha=16.0, dropout=0.0, targets="q,k,v,o,mlp")
    cfg.model.update(remat="none")
    cfg.data.update(seq_len=96, global_batch_size=16)
    cfg.optim.update(learning_rate=1e-4, warmup_steps=5, schedule="cosine", weight_decay=0.0)
    cfg.train.update(steps=60, log_every=10, eval_every=20)
    cfg.checkpoint.update(every=60, keep=1)
    return cfg
