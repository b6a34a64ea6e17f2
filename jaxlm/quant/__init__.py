"""Quantization: the model's matmuls on int8 / fp8 operands, through Qwix.

Owns:
    training    quantized training (config `quant`): a model whose hidden-state matmuls
                Qwix intercepts and quantizes, forward and optionally backward; the
                parameters stay float

May import: jaxlm.errors, config, model; jax, flax, qwix. The training tasks
(jaxlm.train) use it; nothing here knows them.
"""
