"""Bases for the encoder fine-tuning tests: a word-level Hugging Face tokenizer.json built
locally with the `tokenizers` library (one id per word of the toy data: a tiny model learns
the toy tasks in a minute, where bytes would take many), and a run directory holding a tiny
bert or t5 with its own initialisation, as `jaxlm train` leaves one (checkpoints/1 with its
config, tokenizer/)."""

from __future__ import annotations

import pathlib
import re

import jax
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import manager as checkpoint_lib
from jaxlm.data import tokenizers
from jaxlm.model import zoo
from jaxlm.parallel import rules

WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits into
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def word_tokenizer(path: pathlib.Path, texts, style: str) -> tokenizers.HFTokenizer:
    """A WordLevel tokenizer.json over the words of `texts`. style "bert": [CLS] text [SEP]
    (BertProcessing: BOS [CLS], EOS [SEP], pad [PAD]); "t5": text </s> (pad 0, no BOS)."""
    hf = tokenizers._import_tokenizers()
    specials = BERT_SPECIALS if style == "bert" else T5_SPECIALS
    words = sorted({w for text in texts for w in WORD.findall(text)} - set(specials))
    vocab = {w: i for i, w in enumerate((*specials, *words))}
    tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token=specials[1 if style == "bert" else 2]))
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    if style == "bert":
        tok.post_processor = hf.processors.BertProcessing(("[SEP]", vocab["[SEP]"]),
                                                          ("[CLS]", vocab["[CLS]"]))
    else:
        tok.post_processor = hf.processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tokenizers.HFTokenizer.from_file(path)


def base_config(family: str, tokenizer: tokenizers.Tokenizer, tokenizer_path: str = "",
                **model):
    """A tiny bert or t5 config (d_model 64, 2 layers) for `tokenizer`, resolved."""
    cfg = config_lib.defaults()
    if family == "bert":
        cfg.model.update(family="bert", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                         d_ff=128, max_seq_len=64, type_vocab_size=2, activation="gelu",
                         norm_eps=1e-12, init_std=0.02)
        cfg.objective.name = "masked_lm"
    else:
        cfg.model.update(family="t5", d_model=64, n_layers=2, n_decoder_layers=2, n_heads=4,
                         n_kv_heads=4, head_dim=16, d_ff=128, max_seq_len=64,
                         activation="gelu_tanh", gated_mlp=True, tie_embeddings=False,
                         relative_buckets=16, relative_max_distance=32, norm_eps=1e-6)
        cfg.objective.name = "span_corruption"
    cfg.model.update(vocab_size=0, dtype="float32", remat="none", **model)
    cfg.data.update(tokenizer=tokenizer.name, tokenizer_path=tokenizer_path, seq_len=32,
                    global_batch_size=8)
    cfg.metrics.update(tensorboard=False)
    return config_lib.resolved(cfg, tokenizer.vocab_size, jax.device_count())


def write_base(workdir: pathlib.Path, cfg, tokenizer: tokenizers.Tokenizer, seed: int = 0):
    """checkpoints/1 (the family's own initialisation from `seed`) and tokenizer/; returns
    the parameters."""
    state = nnx.state(zoo.create(cfg.model, seed))
    params = nnx.to_pure_dict(state)
    tokenizer.save(workdir / "tokenizer")
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.checkpoint)
    metadata = checkpoint_lib.run_metadata(cfg, rules.axes_of(state), tokenizer.name)
    checkpointer.save(1, {"step": jax.numpy.asarray(1, jax.numpy.int32), "params": params}, {},
                      metadata)
    checkpointer.wait()
    checkpointer.close()
    return params
