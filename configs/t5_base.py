"""A T5 v1.1-base-shaped encoder-decoder (248M parameters): 12 + 12 layers, d_model 768, 12
heads of 64, gated-GELU MLP 2048, vocabulary 32,128 (T5's SentencePiece + 100 sentinels),
untied head, span-corruption pretraining with 512 input tokens (114 target tokens), bfloat16.

    jaxlm train --config configs/t5_base.py --workdir runs/t5_base \
        --config.data.tokenizer=sentencepiece --config.data.tokenizer_path=T5_DIR/spiece.model

Targets a TPU v5p-8 slice (4 chips, mesh.topology) with FSDP over all chips. Checked from
any host (needs the `tpu` extra):
    jaxlm compile --config configs/t5_base.py
prints the per-chip memory (the README's table) and the step time at 50% MFU.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="t5", d_model=768, n_layers=12, n_decoder_layers=12, n_heads=12,
                     n_kv_heads=12, head_dim=64, d_ff=2048, vocab_size=32128, max_seq_len=512,
                     activation="gelu_tanh", gated_mlp=True, tie_embeddings=False,
                     relative_buckets=32, relative_max_distance=128, norm_eps=1e-6,
                     dtype="bfloat16", remat="save_matmuls")
    cfg.objective.update(name="span_corruption", noise_density=0.15, mean_span_length=3.0)
    cfg.data.update(seq_len=512, global_batch_size=256)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, topology="v5p-8")
    cfg.optim.update(learning_rate=1e-3, warmup_steps=10_000, weight_decay=0.0)
    cfg.train.update(steps=524_288, log_every=100)
    cfg.checkpoint.update(every=5000, keep=3)
    return cfg
