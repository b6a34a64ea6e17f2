"""GPT-2 small (124M parameters): 12 layers, d_model 768, 12 heads, vocabulary 50,304 (50,257
padded to a multiple of 128), 1,024 positions, tied embeddings, bfloat16 compute.

    jaxlm train --config configs/gpt2_124m.py --workdir runs/gpt2

For accelerators. Target: a TPU v5p-8 slice (4 chips, mesh.topology), FSDP over its chips,
131k tokens per chip per step. Checked from any host (needs the `tpu` extra):

    jaxlm compile --config configs/gpt2_124m.py

prints per chip: arguments 0.38 GiB, temporaries 34.57 GiB, total 34.98 of 95.74 GiB
usable HBM (fits), and 0.46 s per step at 50% MFU (splash attention, model.attention auto
on TPU, and the blockwise loss in blocks of 256 positions; before both: 66.96 GiB). With the
byte tokenizer the wide vocabulary is mostly unused; a GPT-2 tokenizer comes with the data
issue.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="gpt2", d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                     d_ff=3072, vocab_size=50304, max_seq_len=1024, tie_embeddings=True,
                     norm_eps=1e-5, dtype="bfloat16", remat="save_matmuls")
    cfg.data.update(seq_len=1024, global_batch_size=512)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, topology="v5p-8")
    cfg.optim.update(learning_rate=6e-4, warmup_steps=700, min_lr_ratio=0.1, weight_decay=0.1,
                     b2=0.95, grad_accum_steps=1)
    cfg.train.update(steps=20_000, log_every=50)
    cfg.checkpoint.update(every=1000, keep=3)
    return cfg
