"""A 3.4M-parameter BERT-style encoder pretrained by masked language modelling on the
standard-library corpus, bytes.

    jaxlm train --config configs/bert_tiny.py --workdir runs/bert_tiny
    jaxlm eval --workdir runs/bert_tiny          # the masked-LM loss on the validation split

Each row packs whole documents (segment ids keep them apart); 15% of the real tokens are
predicted: 80% shown as the mask id (the last of the 384 embedding rows: the byte
tokenizer has no mask token), 10% as a random byte, 10% unchanged. Expect on a 2-core
laptop CPU: see the README's loss curve (measured with this command).
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="bert", d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                     d_ff=1024, vocab_size=0, max_seq_len=256, type_vocab_size=2,
                     activation="gelu", norm_eps=1e-12, dtype="float32", remat="none")
    cfg.objective.update(name="masked_lm", mask_rate=0.15)
    cfg.data.update(seq_len=256, global_batch_size=16)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01)
    cfg.train.update(steps=300, log_every=10)
    cfg.checkpoint.update(every=100, keep=2)
    return cfg
