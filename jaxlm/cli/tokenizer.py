"""`jaxlm tokenizer train`: a SentencePiece tokenizer trained on the configured corpus.

    jaxlm tokenizer train --config configs/tiny.py --vocab-size 8000 --out tok.model
"""

from __future__ import annotations

import argparse

from jaxlm import config as config_lib
from jaxlm import errors
from jaxlm.cli import helptext
from jaxlm.cli.train import DEFAULT_CONFIG, add_config_argument

VERBS = ("tokenizer",)


def add_parsers(verbs) -> None:
    tok = verbs.add_parser("tokenizer", help="train a SentencePiece tokenizer on the configured data",
                           description=__doc__, epilog=helptext.overrides_epilog())
    tok.add_argument("action", choices=["train"], help="train: write a new tokenizer")
    add_config_argument(tok)
    tok.add_argument("--vocab-size", type=int, required=True,
                     help="ids of the tokenizer (required; e.g. 8000)")
    tok.add_argument("--out", required=True, help="path of the .model file to write")
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                     help="SentencePiece algorithm")
    tok.add_argument("--max-documents", type=int, default=100_000,
                     help="documents of the train split read (in order)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Trains SentencePiece on the train split of every source in data.dataset."""
    from jaxlm.data import sources, tokenizers

    cfg = config_lib.load(args.config or DEFAULT_CONFIG, overrides)
    path = tokenizers.train_sentencepiece(
        sources.documents(cfg.data, "train", args.max_documents), args.out, args.vocab_size,
        model_type=args.model_type)
    print(f"wrote {path}; use it with --config.data.tokenizer=sentencepiece "
          f"--config.data.tokenizer_path={path}")
    return errors.DONE
