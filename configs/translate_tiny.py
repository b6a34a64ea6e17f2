"""Text-to-text fine-tuning of the span-corruption base (configs/t5_tiny.py): translation into
the invented language of jaxlm/finetune/data/translate_tiny_*.jsonl (jaxlm.finetune.toy), its
own lexicon and adjectives after their nouns ("the big dog sees a red cat" -> "lo kano grana
vidas na gato roso"). The whole model trains on the target tokens, teacher-forced.

    jaxlm train --config configs/t5_tiny.py --workdir runs/t5_tiny            # the base
    jaxlm finetune --config configs/translate_tiny.py --config.finetune.base=runs/t5_tiny
    jaxlm eval --workdir runs/translate_tiny --json   # loss, exact_match on the 200 held out

Encoder rows pack several inputs (bytes + EOS), decoder rows their targets (+ EOS); the
evaluation decodes each held-out input greedily and counts exact matches. Expect on a
2-core CPU (base: the 300-step t5_tiny run): about 0.4 s per step, about 7 minutes; the
held-out loss per byte falls from 3.57 to 0.39 at step 250 and 0.22 at 1000, the word order
comes first and the lexicon slowly: exact match stays low (0.015 at step 1000) as each word
is a spelling to learn. With one id per word the same task reaches 0.965 in 300 steps of a
random 2 + 2-layer t5 (tests/finetune/test_encoder_tasks.py).
"""

from jaxlm.config import defaults
from jaxlm.finetune.examples import data_path


def get_config():
    cfg = defaults()
    cfg.finetune.update(task="seq2seq", method="full", base="runs/t5_tiny",
                        train_file=data_path("translate_tiny_train.jsonl"),
                        eval_file=data_path("translate_tiny_eval.jsonl"), target_len=64)
    # The base decides the model; the family here only lets the config be checked alone.
    cfg.model.update(family="t5", remat="none")
    cfg.data.update(seq_len=64, global_batch_size=16)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=10, schedule="cosine", weight_decay=0.0)
    cfg.train.update(steps=1000, log_every=10, eval_every=250)
    cfg.checkpoint.update(every=0, keep=1)
    return cfg
