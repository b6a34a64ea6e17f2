"""Hugging Face tokenizer.json (`HFTokenizer`), through the `tokenizers` library only.

The file's post-processor decides the BOS convention, as it does for transformers: a
sequence starts with BOS (`adds_bos`) when the post-processor puts exactly the BOS id in
front of a single sequence (TemplateProcessing "<s> $A", Roberta/BertProcessing's CLS);
ByteLevel (GPT-2) or no post-processor add nothing. The one special token a post-processor
prepends is the BOS, whatever it is called, and the one it appends is the EOS (BERT's
[SEP], T5's and RoBERTa's </s>); otherwise the usual names below decide.

Masked LM's mask token is the special token [MASK] (BERT) or <mask> (RoBERTa); span
corruption's sentinels are the added tokens <extra_id_0>, <extra_id_1>, ... (T5's
tokenizer.json, counting down from its top id).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from jaxlm.data.tokenizers.base import _FileTokenizer

_HF_FILE = "tokenizer.json"

_HF_BOS = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[BOS]")
_HF_EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[EOS]")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_HF_MASK = ("[MASK]", "<mask>")
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class HFTokenizer(_FileTokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (no `transformers`, no remote code)."""

    name = "hf"
    file_name = _HF_FILE

    def _load(self, model: bytes, source: str) -> None:
        hf = _import_tokenizers()
        try:
            text = model.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} is not a Hugging Face tokenizer.json: not UTF-8 "
                             f"({e})") from None
        try:
            tok = hf.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for invalid files
            raise ValueError(f"{source} is not a valid Hugging Face tokenizer.json: {e}") from None
        # A file may configure padding/truncation for batches: ids must not depend on them.
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True  # "</s>" in a document is text, not EOS
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError(f"{source} is not a valid Hugging Face tokenizer.json: empty vocabulary")
        self._tok = tok
        self.vocab_size = max(vocab.values()) + 1

    def _special(self) -> dict[str, int]:
        """The special added tokens: content -> id."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                if t.special}

    def _special_ids(self) -> tuple[int, int | None, int | None, bool]:
        special = self._special()

        def first(names: tuple[str, ...]) -> int | None:
            return next((special[n] for n in names if n in special), None)
        bos, eos, pad = first(_HF_BOS), first(_HF_EOS), first(_HF_PAD)
        prefix, suffix = self.post_processor_prefix(), self.post_processor_suffix()
        if len(prefix) == 1 and prefix[0] in special.values():
            bos = prefix[0]  # what the post-processor starts with (e.g. BertProcessing's [CLS])
        if len(suffix) == 1 and suffix[0] in special.values():
            eos = suffix[0]  # what it ends with (e.g. BERT's [SEP])
        if pad is not None:
            return pad, bos, eos, True
        return (eos, bos, eos, True) if eos is not None else (0, bos, eos, False)

    def _file_mask_id(self) -> int | None:
        special = self._special()
        return next((special[n] for n in _HF_MASK if n in special), None)

    def _file_sentinels(self) -> list[int]:
        """<extra_id_0>, <extra_id_1>, ... while they are added tokens."""
        numbered = {}
        for i, t in self._tok.get_added_tokens_decoder().items():
            match = _SENTINEL.fullmatch(t.content)
            if match:
                numbered[int(match.group(1))] = i
        ids = []
        while len(ids) in numbered:
            ids.append(numbered[len(ids)])
        return ids

    def _own_special_ids(self) -> list[int]:
        return list(self._special().values())

    def post_processor_prefix(self) -> list[int]:
        """The ids the post-processor puts before a single sequence."""
        post = self._tok.post_processor
        return [] if post is None else prefix_ids(json.loads(post.__getstate__()))

    def post_processor_suffix(self) -> list[int]:
        """The ids the post-processor puts after a single sequence."""
        post = self._tok.post_processor
        return [] if post is None else suffix_ids(json.loads(post.__getstate__()))

    def _file_adds_bos(self) -> bool:
        return self.bos_id is not None and self.post_processor_prefix() == [self.bos_id]

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32).reshape(-1)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._tok.decode(self._kept_ids(ids).tolist(), skip_special_tokens=False)


def prefix_ids(post: dict[str, Any] | None) -> list[int]:
    """The ids a tokenizer.json post-processor (parsed JSON) puts before a single sequence."""
    kind = (post or {}).get("type")
    if kind == "Sequence":  # each processor wraps the output of the ones before it
        ids: list[int] = []
        for inner in post.get("processors") or []:
            ids = prefix_ids(inner) + ids
        return ids
    if kind == "TemplateProcessing":
        ids = []
        for piece in post.get("single") or []:
            if "SpecialToken" not in piece:
                break
            ids += post["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
        return ids
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [int(post["cls"][1])]
    return []


def suffix_ids(post: dict[str, Any] | None) -> list[int]:
    """The ids a tokenizer.json post-processor (parsed JSON) puts after a single sequence."""
    kind = (post or {}).get("type")
    if kind == "Sequence":  # each processor wraps the output of the ones before it
        ids: list[int] = []
        for inner in post.get("processors") or []:
            ids = ids + suffix_ids(inner)
        return ids
    if kind == "TemplateProcessing":
        ids = []
        for piece in reversed(post.get("single") or []):
            if "SpecialToken" not in piece:
                break
            ids = post["special_tokens"][piece["SpecialToken"]["id"]]["ids"] + ids
        return ids
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [int(post["sep"][1])]
    return []


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("data.tokenizer='hf' needs the Hugging Face tokenizers package: "
                          "pip install 'jaxlm[hf]'") from e
    return tokenizers
