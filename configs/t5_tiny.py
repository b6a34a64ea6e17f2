"""A T5 v1.1-shaped encoder-decoder (gated GELU, untied head; 4 + 4 layers, d_model 256)
pretrained by span corruption on the standard-library corpus, bytes.

    jaxlm train --config configs/t5_tiny.py --workdir runs/t5_tiny
    jaxlm eval --workdir runs/t5_tiny            # the span-corruption loss on validation

15% of each document's bytes are corrupted in spans of mean length 3; each span becomes one
sentinel id (the top ids of the 384 embedding rows, above the byte tokenizer's 259) in the
encoder's 256-byte input, and the decoder predicts the sentinels followed by their spans.
Expect on a 2-core laptop CPU: see the README's loss curve (measured with this command).
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="t5", d_model=256, n_layers=4, n_decoder_layers=4, n_heads=4,
                     n_kv_heads=4, head_dim=64, d_ff=512, vocab_size=0, max_seq_len=256,
                     activation="gelu_tanh", gated_mlp=True, tie_embeddings=False,
                     relative_buckets=32, relative_max_distance=128, norm_eps=1e-6,
                     dtype="float32", remat="none")
    cfg.objective.update(name="span_corruption", noise_density=0.15, mean_span_length=3.0)
    cfg.data.update(seq_len=256, global_batch_size=16)
    cfg.optim.update(learning_rate=1e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01)
    cfg.train.update(steps=300, log_every=10)
    cfg.checkpoint.update(every=100, keep=2)
    return cfg
