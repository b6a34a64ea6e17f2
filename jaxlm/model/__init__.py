"""The model zoo: families of Transformer models, the layers they share, and the registry
that picks one by `model.family`.

Owns:
    zoo         the registry: each family's record (its checks, analytic counts, LoRA
                targets, where its network lives) and building a model of any family
    decoder     the decoder-only stack every decoder family shares (block, head) and the
                layer scan every family uses (run_blocks)
    llama, gpt2 the decoder-only families' networks
    moe         family moe: llama's network with a mixture of experts as each MLP (router,
                dropless / capacity / dense dispatch, routing figures); moe_cpu its
                dropless mixture on CPU (batched matmuls and blocks, its own backward)
    bert        the encoder-only family (BERT, RoBERTa): masked-LM network
    t5, t5_layers   the encoder-decoder family (T5 v1.0, v1.1, mT5) and its layers
    layers, attention, kv_cache   shared layers: norms, MLPs, rotary embeddings, attention
                backends, the KV cache of generation
    splash      the splash attention backend (Pallas, TPU; interpreted elsewhere)
    context     context parallelism's balanced layout of a row over the context axis
    counts      head size, matmul parameters, analytic FLOPs
    adapters    LoRA adapters folded into the weights they adapt (merge, on the host)
    quantized   weights stored as int8 / int4 / nf4 codes with scales (a quantized run,
                model.weights), rebuilt layer by layer inside the jitted computation

May import: jaxlm.errors, jaxlm.config, jaxlm.parallel.rules (logical axis names, and
shard_map by them for kernels XLA cannot partition; the mesh never appears here), JAX and
Flax. `zoo` and `counts` import no JAX.
"""
