"""A BERT-large-shaped encoder (335M parameters): 24 layers, d_model 1024, 16 heads, GELU
MLP 4096, vocabulary 30,522 (BERT's WordPiece), 512 positions, two token types, masked-LM
pretraining at sequence 512, bfloat16 compute.

    jaxlm train --config configs/bert_large.py --workdir runs/bert_large \
        --config.data.tokenizer=hf --config.data.tokenizer_path=BERT_DIR/tokenizer.json

Targets a TPU v5p-8 slice (4 chips, mesh.topology) with FSDP over all chips. Checked from
any host (needs the `tpu` extra):
    jaxlm compile --config configs/bert_large.py
prints the per-chip memory (the README's table) and the step time at 50% MFU.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="bert", d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                     d_ff=4096, vocab_size=30522, max_seq_len=512, type_vocab_size=2,
                     activation="gelu", norm_eps=1e-12, tie_embeddings=True,
                     dtype="bfloat16", remat="save_matmuls")
    cfg.objective.update(name="masked_lm", mask_rate=0.15)
    cfg.data.update(seq_len=512, global_batch_size=256)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, topology="v5p-8")
    cfg.optim.update(learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.01)
    cfg.train.update(steps=1_000_000, log_every=100)
    cfg.checkpoint.update(every=5000, keep=3)
    return cfg
