"""CPU benchmark shape for the encoder-decoder family: T5 v1.1 at bench_cpu's width and depth.
d_model 512, 8 encoder + 8 decoder layers, 8 heads of 64, gated tanh-GELU MLP 1408 (the
width of bench_cpu's SwiGLU: the same MLP weights per block), untied head, bytes (384
embedding rows), 256 encoder input tokens and T5's derived 58 target tokens (noise density
0.15, mean span 3), global batch 8, float32, span-corruption objective (60.2M
parameters); remat save_matmuls (on the 2-core machine 53% MFU against 48% with full remat,
README Performance).

    jaxlm bench step --config configs/bench_cpu_t5.py

8 + 8 layers rather than 4 + 4: T5 names depth per stack (T5-small is 6 + 6 at this width),
so each stack has bench_cpu's depth and the encoder, which reads 256 of every example's 314
tokens, is bench_cpu's stack over the same rows; 4 + 4 would halve the encoder and make a
shallower model than the one it is compared with.

Prints tokens/s (encoder input tokens, the loop's count), step time, model FLOP/s
(jaxlm.model.counts.encoder_decoder_flops_per_step: every weight over the tokens it
multiplies, encoder attention full, decoder self-attention causal, cross-attention full)
and this host's measured float32 matmul FLOP/s; the figures measured on a 2-core machine are
in the README.
"""

from jaxlm.config import defaults


def get_config():
    cfg = defaults()
    cfg.model.update(family="t5", d_model=512, n_layers=8, n_decoder_layers=8, n_heads=8,
                     n_kv_heads=8, head_dim=64, d_ff=1408, vocab_size=384, max_seq_len=256,
                     activation="gelu_tanh", gated_mlp=True, tie_embeddings=False,
                     relative_buckets=32, relative_max_distance=128, norm_eps=1e-6,
                     dtype="float32", remat="save_matmuls")
    cfg.objective.update(name="span_corruption", noise_density=0.15, mean_span_length=3.0)
    cfg.data.update(seq_len=256, global_batch_size=8)
    cfg.mesh.update(data=1, fsdp=-1, tensor=1)
    cfg.train.update(steps=20, log_every=5)
    cfg.checkpoint.update(every=0)
    return cfg
