"""Supervised fine-tuning (all parameters) of the default pretraining run on a small
synthetic instruction set shipped with jaxlm (jaxlm/finetune/data/sft_tiny.jsonl: Python
literal types and identifiers in capitals, prompt/response and chat lines).

    jaxlm train                                         # the base: runs/tiny
    jaxlm finetune --config configs/sft_tiny.py         # -> runs/sft_tiny
    jaxlm generate --workdir runs/sft_tiny --max-new-tokens 16 \\
        --prompt $'<|user|>\\nWhat is the type of 3.5?\\n<|assistant|>\\n'

Loss is on the assistant's tokens only (default template); examples are packed with their
own segment ids (about 3.8 per row). Expect on a 2-core CPU: 1-2 s per step, 3-6 minutes;
the held-out loss per response token falls from 4.30 (the base) to 0.32 at step 50, 0.08
at step 100 and 0.02 at step 150, and the model answers "float" (and "PARSER_KEY" for
"Uppercase: parser_key"). Full fine-tuning is this config's method; LoRA is
configs/lora_tiny.py.
"""

from jaxlm.config import defaults
from jaxlm.finetune.examples import data_path


def get_config():
    cfg = defaults()
    cfg.finetune.update(task="sft", method="full", base="runs/tiny",
                        train_file=data_path("sft_tiny.jsonl"), eval_fraction=0.1,
                        template="default", packing=True)
    cfg.model.update(remat="none")  # runtime keys; the architecture comes from the base
    cfg.data.update(seq_len=256, global_batch_size=16)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=10, schedule="cosine")
    cfg.train.update(steps=150, log_every=10, eval_every=50)
    cfg.checkpoint.update(every=50, keep=2)
    return cfg
