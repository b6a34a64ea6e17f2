"""Quantization: the model's matmuls on int8 / fp8 operands through Qwix, and float
checkpoints read as quantized parameters.

Owns:
    training    quantized training (config `quant`): a model whose hidden-state matmuls
                Qwix intercepts and quantizes, forward and optionally backward; the
                parameters stay float
    weights     a float checkpoint's parameters restored and quantized where they are
                placed (QLoRA's frozen base, `jaxlm quantize`), by model.weights

May import: jaxlm.errors, config, parallel, model, checkpoint; jax, flax, qwix. The
training tasks (jaxlm.train), fine-tuning and inference use it; nothing here knows them.
The weight formats themselves (codes, scales, how a model reads them) are the model's:
jaxlm/model/quantized.py.
"""
