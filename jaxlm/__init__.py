"""jaxlm: pretrain and fine-tune Transformer language models with JAX and Flax NNX."""

__version__ = "0.1.0"
