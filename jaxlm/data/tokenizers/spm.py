"""SentencePiece: loading a .model (`SentencePieceTokenizer`) and `train_sentencepiece`.

Named spm, not sentencepiece, so that it can never shadow the `sentencepiece` library.

T5's sentinels <extra_id_0> ... are not in its .model: transformers' T5Tokenizer appends
`extra_ids` (100) ids after the SentencePiece vocabulary, <extra_id_0> the highest
(vocab_size = pieces + extra_ids). `extra_ids` does the same here; loading a .model from a
Hugging Face directory (spiece.model) takes it from the tokenizer_config.json or
config.json beside it (`hf_extra_ids`). Encoding never emits them (spelled in a document,
"<extra_id_0>" is text); decoding writes them as "<extra_id_N>".
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.data.tokenizers.base import _atomic_write, _FileTokenizer

_SP_FILE = "tokenizer.model"
_SP_HF_FILE = "spiece.model"  # the name in a Hugging Face T5 (and ALBERT, XLNet) directory
_MASK_PIECES = ("[MASK]", "<mask>")
# transformers' T5Tokenizer default, for a directory that names T5 but not the count.
_T5_EXTRA_IDS = 100
_T5_TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast")
_T5_MODEL_TYPES = ("t5", "mt5")

# Special ids of models trained by `train_sentencepiece`.
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3

# SentencePiece training: documents are cut into "sentences" of whole lines of at most
# _CHUNK_BYTES UTF-8 bytes (a longer line is cut into pieces of _LONG_LINE_CHARS characters,
# at most 4 bytes each), well under the trainer's max_sentence_length, beyond which it
# silently drops a sentence.
_CHUNK_BYTES = 4096
_LONG_LINE_CHARS = _CHUNK_BYTES // 4
_MAX_SENTENCE_BYTES = 2 * _CHUNK_BYTES
# Fixed, not the machine's core count: the count is stored in the model, and a fixed one
# keeps the model bytes identical across machines.
_SP_TRAIN_THREADS = 16


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece model (the serialized `.model` protobuf)."""

    name = "sentencepiece"
    file_name = _SP_FILE
    alt_file_names = (_SP_HF_FILE,)

    def __init__(self, model: bytes, *, extra_ids: int = 0, **kwargs: Any):
        """`extra_ids`: sentinel ids appended after the pieces, as T5's (see the module)."""
        if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or extra_ids < 0:
            raise ValueError(f"{kwargs.get('source', '<bytes>')}: extra_ids={extra_ids!r} must "
                             f"be an integer >= 0")
        self._extra_ids = extra_ids
        self._control: list[int] | None = None
        super().__init__(model, **kwargs)

    def _load(self, model: bytes, source: str) -> None:
        spm = _import_sentencepiece()
        if not model:  # sentencepiece accepts b"" as "no model" and fails later
            raise ValueError(f"{source} is not a SentencePiece model: the file is empty")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model)
        except RuntimeError as e:
            raise ValueError(f"{source} is not a valid SentencePiece model: {e}") from None
        self._pieces = int(self._sp.get_piece_size())
        if self._pieces <= 0:
            raise ValueError(f"{source} is not a valid SentencePiece model: no pieces")
        self.vocab_size = self._pieces + self._extra_ids

    def _file_mask_id(self) -> int | None:
        """A control piece [MASK] or <mask> (a control piece is never parsed from text)."""
        for piece in _MASK_PIECES:
            i = int(self._sp.piece_to_id(piece))
            if self._sp.is_control(i) and self._sp.id_to_piece(i) == piece:
                return i
        return None

    def _file_sentinels(self) -> list[int]:
        return [self.vocab_size - 1 - k for k in range(self._extra_ids)]

    def _own_special_ids(self) -> list[int]:
        if self._control is None:  # control (<s>, </s>, <pad>) and unknown pieces
            self._control = [i for i in range(self._pieces)
                             if self._sp.is_control(i) or self._sp.is_unknown(i)]
        return self._control

    def _options(self) -> dict[str, Any]:
        return {"extra_ids": self._extra_ids} if self._extra_ids else {}

    @classmethod
    def _saved_options(cls, config: dict[str, Any], config_path: Path) -> dict[str, Any]:
        extra = config.get("extra_ids", 0)
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise ValueError(f"{config_path}: extra_ids must be an integer >= 0, got {extra!r}")
        return {"extra_ids": extra} if extra else {}

    @classmethod
    def _options_beside(cls, path: Path) -> dict[str, Any]:
        extra = hf_extra_ids(path.parent)
        return {"extra_ids": extra} if extra else {}

    def _special_ids(self) -> tuple[int, int | None, int | None, bool]:
        def known(i: int) -> int | None:
            return int(i) if 0 <= i < self.vocab_size else None
        bos, eos, pad = known(self._sp.bos_id()), known(self._sp.eos_id()), known(self._sp.pad_id())
        if pad is not None:
            return pad, bos, eos, True
        return (eos, bos, eos, True) if eos is not None else (0, bos, eos, False)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32).reshape(-1)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        kept = self._kept_ids(ids).tolist()
        if not self._extra_ids:
            return self._sp.decode(kept)
        parts, run = [], []
        for i in kept:
            if i < self._pieces:
                run.append(i)
            else:  # a sentinel
                parts += [self._sp.decode(run), f"<extra_id_{self.vocab_size - 1 - i}>"]
                run = []
        return "".join([*parts, self._sp.decode(run)])


def hf_extra_ids(directory: Path) -> int:
    """How many <extra_id_N> ids transformers appends to the SentencePiece vocabulary of
    the Hugging Face model `directory`: tokenizer_config.json's extra_ids; else 100 when
    it or config.json names T5 (transformers' default); else 0. ValueError naming a file
    that is there but is not a JSON object."""
    found = {}
    for name in ("tokenizer_config.json", "config.json"):
        path = directory / name
        if not path.is_file():
            found[name] = {}
            continue
        try:
            found[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); it says how many sentinel ids "
                             f"the SentencePiece model beside it has") from None
        if not isinstance(found[name], dict):
            raise ValueError(f"{path}: not a JSON object")
    tokenizer_config, config = found["tokenizer_config.json"], found["config.json"]
    if "extra_ids" in tokenizer_config:
        extra = tokenizer_config["extra_ids"]
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise ValueError(f"{directory / 'tokenizer_config.json'}: extra_ids must be an "
                             f"integer >= 0, got {extra!r}")
        return extra
    if tokenizer_config.get("tokenizer_class") in _T5_TOKENIZER_CLASSES \
            or config.get("model_type") in _T5_MODEL_TYPES:
        return _T5_EXTRA_IDS
    return 0


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, vocab_size: int, *,
                        model_type: str = "bpe", max_sentences: int = 2_000_000,
                        byte_fallback: bool = True) -> Path:
    """Trains a SentencePiece model on `texts` (documents) in memory; writes `out_path`.

    Ids: pad 0, unk 1, bos 2, eos 3 (`SP_*_ID`). Text is kept exactly: identity normalization,
    no added dummy "▁" prefix, whitespace neither collapsed nor stripped, newlines part of
    pieces; with `byte_fallback` any character outside the vocabulary becomes its UTF-8 byte
    pieces, so decode(encode(text)) == text for every text except one containing U+2581 "▁"
    (SentencePiece's own space symbol, decoded as a space). Digits are split one per piece,
    runs of spaces may form a piece (indentation).

    Each document is cut into "sentences" of whole lines of at most 4096 UTF-8 bytes (a longer
    line is cut into 1024-character pieces), since the trainer drops a sentence longer than
    its max_sentence_length; pieces therefore never span a cut. At most the first
    `max_sentences` sentences are used (no sampling), so the same input gives the same model
    bytes on every machine. Documents may also be bytes (decoded as UTF-8, errors replaced).
    """
    spm = _import_sentencepiece()
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 1 or max_sentences < 1:
        raise ValueError(f"need vocab_size >= 1 and max_sentences >= 1, got {vocab_size}, "
                         f"{max_sentences}")
    out_path = Path(os.path.expanduser(str(out_path)))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts, max_sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=int(vocab_size),
            pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID,
            byte_fallback=bool(byte_fallback),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=0,  # use every sentence given: no random sampling
            shuffle_input_sentence=False,
            num_threads=_SP_TRAIN_THREADS,
            minloglevel=1,  # warnings and errors only
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_path, model.getvalue())
    return out_path


def _training_sentences(texts: Iterable[str | bytes], limit: int) -> Iterator[str]:
    count = 0
    for text in texts:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")
        for chunk in _chunks(text):
            yield chunk
            count += 1
            if count >= limit:
                return


def _chunks(text: str) -> Iterator[str]:
    """Whole lines (with their line ends) grouped into chunks of at most _CHUNK_BYTES bytes."""
    parts: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        pieces = [line] if len(line) <= _LONG_LINE_CHARS else [
            line[i:i + _LONG_LINE_CHARS] for i in range(0, len(line), _LONG_LINE_CHARS)]
        for piece in pieces:
            n = len(piece.encode("utf-8"))
            if parts and size + n > _CHUNK_BYTES:
                yield "".join(parts)
                parts, size = [], 0
            parts.append(piece)
            size += n
    if parts:
        yield "".join(parts)


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("data.tokenizer='sentencepiece' needs the sentencepiece package: "
                          "pip install sentencepiece") from e
    return sentencepiece
