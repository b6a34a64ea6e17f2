"""Tokenizers: byte-level (no file), SentencePiece (.model) and Hugging Face (tokenizer.json).

Every tokenizer implements `Tokenizer`: `encode(text)` gives int32 ids without BOS/EOS (the
pipeline adds them), `decode(ids)` skips pad/BOS/EOS, and `save(directory)` writes what
`load_saved(directory)` needs to rebuild it exactly (a run's workdir keeps its tokenizer).
`load_tokenizer(data_cfg)` builds the one named by config keys `data.tokenizer` and
`data.tokenizer_path`.

Special ids
    byte           pad 0, bos 1, eos 2; byte b -> id b + 3 (vocab 259).
    sentencepiece  bos/eos/pad from the model (`bos_id()` etc.; -1 means none, so None).
                   No pad in the model: pad = eos, or 0 when there is no eos either.
                   Models from `train_sentencepiece`: pad 0, unk 1, bos 2, eos 3.
    hf             Looked up among the tokenizer's *special* added tokens (a plain vocabulary
                   entry such as "<s>" in a byte-level BPE is never taken), first match wins:
                     bos  <|begin_of_text|>, <s>, <|startoftext|>, <bos>, [BOS]
                     eos  <|end_of_text|>, </s>, <|endoftext|>, <eos>, [EOS]
                     pad  <pad>, [PAD], <|pad|>, <|padding|>
                   Not found: bos/eos None; pad = eos, or 0 when there is no eos either.
    A pad that is only the fallback id 0 is not skipped by `decode` (it may be a real token);
    the pipeline masks padding with weights anyway.

Text that happens to spell a special token ("</s>", "<|endoftext|>") is encoded as text by
every tokenizer here: documents cannot inject control ids (SentencePiece never parses them;
for hf this sets `encode_special_tokens`).

Loading never unpickles and never runs code: a .model is a protobuf, tokenizer.json is JSON.
`sentencepiece` and `tokenizers` are imported only when a tokenizer of that kind is built.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: File `save` writes into its directory, naming the tokenizer's type and model file.
SAVED_CONFIG = "jaxlm_tokenizer.json"
_SAVED_FORMAT = 1
_SP_FILE = "tokenizer.model"
_HF_FILE = "tokenizer.json"

# Special ids of models trained by `train_sentencepiece`.
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3

_HF_BOS = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[BOS]")
_HF_EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[EOS]")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")

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


class Tokenizer(abc.ABC):
    """What the pipeline and generation use. Ids are in [0, vocab_size)."""

    name: str  # "byte", "sentencepiece" or "hf" (the value of data.tokenizer)
    vocab_size: int  # number of ids the tokenizer can emit (its largest id + 1)
    pad_id: int
    bos_id: int | None  # None: the tokenizer has none
    eos_id: int | None
    fingerprint: str  # sha256 of the model file ("byte" for ByteTokenizer)

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without BOS/EOS."""

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Ids of UTF-8 bytes (TFDS Text features decode to bytes); invalid UTF-8 -> U+FFFD."""
        return self.encode(bytes(data).decode("utf-8", errors="replace"))

    @abc.abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; pad/BOS/EOS and ids outside [0, vocab_size) are skipped."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None:
        """Writes `SAVED_CONFIG` (and the model file) into `directory`, for `load_saved`."""

    def _skipped_ids(self) -> list[int]:
        return [i for i in (self.bos_id, self.eos_id) if i is not None]

    def _kept_ids(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        if not isinstance(ids, (np.ndarray, list, tuple)):
            ids = list(ids)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        keep = (ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._skipped_ids())
        return ids[keep]

    def _saved_config(self, **extra: Any) -> dict[str, Any]:
        return {"type": self.name, "format": _SAVED_FORMAT, **extra,
                "vocab_size": int(self.vocab_size), "pad_id": self.pad_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past three special ids: byte b -> id b + 3."""

    name = "byte"
    vocab_size: int = 259
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    fingerprint = "byte"
    _offset: int = 3

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as int32 ids, without BOS/EOS."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Ids of the bytes themselves (no UTF-8 decoding: every byte string round-trips)."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self._offset

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        ids = self._kept_ids(ids)
        ids = ids[ids >= self._offset]
        return (ids - self._offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / SAVED_CONFIG, _json_bytes(self._saved_config()))


class _FileTokenizer(Tokenizer):
    """A tokenizer rebuilt from the bytes of one model file (kept for `save` and pickling)."""

    _file_name: str

    def __init__(self, model: bytes, *, source: str = "<bytes>",
                 special_ids: dict[str, int | None] | None = None):
        self._model = bytes(model)
        self._source = source
        self.fingerprint = hashlib.sha256(self._model).hexdigest()
        self._load(self._model, source)
        pad, bos, eos, pad_is_special = self._special_ids()
        if special_ids is not None:  # load_saved: exactly the ids the run used
            pad, bos, eos = special_ids["pad_id"], special_ids["bos_id"], special_ids["eos_id"]
            pad_is_special = bool(special_ids.get("pad_is_special", True))
            for key, i in (("pad_id", pad), ("bos_id", bos), ("eos_id", eos)):
                if not (i is None and key != "pad_id" or isinstance(i, int)
                        and 0 <= i < self.vocab_size):
                    raise ValueError(f"{source}: {key}={i!r} is not an id of this tokenizer "
                                     f"(vocab_size {self.vocab_size})")
        self.pad_id, self.bos_id, self.eos_id = pad, bos, eos
        self._pad_is_special = pad_is_special

    @classmethod
    def from_file(cls, path: str | Path) -> _FileTokenizer:
        """Reads `path`; ValueError naming it if it is not a model of this kind."""
        path = Path(os.path.expanduser(str(path)))
        return cls(path.read_bytes(), source=str(path))

    @abc.abstractmethod
    def _load(self, model: bytes, source: str) -> None:
        """Builds the backend; raises ValueError naming `source` for an invalid model."""

    @abc.abstractmethod
    def _special_ids(self) -> tuple[int, int | None, int | None, bool]:
        """(pad, bos, eos, whether pad is a real special token) by the module's rules."""

    def _skipped_ids(self) -> list[int]:
        skipped = super()._skipped_ids()
        return skipped + [self.pad_id] if self._pad_is_special else skipped

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / self._file_name, self._model)
        config = self._saved_config(file=self._file_name, sha256=self.fingerprint,
                                    pad_is_special=self._pad_is_special)
        _atomic_write(directory / SAVED_CONFIG, _json_bytes(config))  # last: marks complete

    def __reduce__(self):  # threads or processes of a data loader may pickle it
        special = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
                   "pad_is_special": self._pad_is_special}
        return _rebuild, (type(self), self._model, self._source, special)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, source={self._source!r})"


def _rebuild(cls: type[_FileTokenizer], model: bytes, source: str,
             special: dict[str, Any]) -> _FileTokenizer:
    return cls(model, source=source, special_ids=special)


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece model (the serialized `.model` protobuf)."""

    name = "sentencepiece"
    _file_name = _SP_FILE

    def _load(self, model: bytes, source: str) -> None:
        spm = _import_sentencepiece()
        if not model:  # sentencepiece accepts b"" as "no model" and fails later
            raise ValueError(f"{source} is not a SentencePiece model: the file is empty")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model)
        except RuntimeError as e:
            raise ValueError(f"{source} is not a valid SentencePiece model: {e}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        if self.vocab_size <= 0:
            raise ValueError(f"{source} is not a valid SentencePiece model: no pieces")

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
        return self._sp.decode(self._kept_ids(ids).tolist())


class HFTokenizer(_FileTokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (no `transformers`, no remote code)."""

    name = "hf"
    _file_name = _HF_FILE

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

    def _special_ids(self) -> tuple[int, int | None, int | None, bool]:
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                   if t.special}

        def first(names: tuple[str, ...]) -> int | None:
            return next((special[n] for n in names if n in special), None)
        bos, eos, pad = first(_HF_BOS), first(_HF_EOS), first(_HF_PAD)
        if pad is not None:
            return pad, bos, eos, True
        return (eos, bos, eos, True) if eos is not None else (0, bos, eos, False)

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32).reshape(-1)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._tok.decode(self._kept_ids(ids).tolist(), skip_special_tokens=False)


_FILE_TOKENIZERS: dict[str, type[_FileTokenizer]] = {
    "sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}
_NAMES = ("byte", *_FILE_TOKENIZERS)


def load_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer of config keys `data.tokenizer` and `data.tokenizer_path` (~ expanded).

    `data.tokenizer_path` is a SentencePiece .model or a tokenizer.json, or a directory
    holding one (tokenizer.model / tokenizer.json) or written by `Tokenizer.save`.
    Raises ValueError naming `data.tokenizer` for an unknown name, FileNotFoundError naming
    the path and `data.tokenizer_path` for a missing file, ValueError naming the path for a
    file that is not a model of that kind.
    """
    name = data_cfg.tokenizer
    if name == "byte":
        return ByteTokenizer()
    if name not in _FILE_TOKENIZERS:
        raise ValueError(f"config.data.tokenizer: unknown tokenizer {name!r}; "
                         f"available: {', '.join(_NAMES)}")
    kind = "a SentencePiece .model" if name == "sentencepiece" else "a Hugging Face tokenizer.json"
    raw = str(getattr(data_cfg, "tokenizer_path", "") or "")
    if not raw:
        raise FileNotFoundError(f"config.data.tokenizer_path: empty; tokenizer {name!r} needs "
                                f"{kind}")
    path = Path(os.path.expanduser(raw))
    if path.is_dir():
        if (path / SAVED_CONFIG).is_file():
            tok = load_saved(path)
            if tok.name != name:
                raise ValueError(f"config.data.tokenizer_path: {path} holds a {tok.name!r} "
                                 f"tokenizer, not {name!r} (config.data.tokenizer)")
            return tok
        path = path / _FILE_TOKENIZERS[name]._file_name
    if not path.is_file():
        raise FileNotFoundError(f"config.data.tokenizer_path: {path} does not exist "
                                f"(tokenizer {name!r} needs {kind})")
    return _FILE_TOKENIZERS[name].from_file(path)


def load_saved(directory: str | Path) -> Tokenizer:
    """Rebuilds the tokenizer `Tokenizer.save(directory)` wrote, with the same special ids."""
    directory = Path(os.path.expanduser(str(directory)))
    config_path = directory / SAVED_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: not a directory written by "
                                f"Tokenizer.save")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        kind = config["type"]
        fmt = config.get("format")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path} is not a valid tokenizer description: {e!r}") from None
    if fmt != _SAVED_FORMAT:
        raise ValueError(f"{config_path}: unsupported format {fmt!r} (expected {_SAVED_FORMAT})")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind in _FILE_TOKENIZERS:
        file_name = config.get("file")
        if not isinstance(file_name, str) or Path(file_name).name != file_name \
                or file_name in ("", ".", ".."):
            raise ValueError(f"{config_path}: invalid model file name {file_name!r}")
        model_path = directory / file_name
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path} does not exist (named by {config_path})")
        model = model_path.read_bytes()
        if hashlib.sha256(model).hexdigest() != config.get("sha256"):
            raise ValueError(f"{model_path} does not match the sha256 in {config_path}: the "
                             f"file changed after it was saved")
        try:
            special = {k: config[k] for k in ("pad_id", "bos_id", "eos_id")}
        except KeyError as e:
            raise ValueError(f"{config_path}: missing {e}") from None
        special["pad_is_special"] = bool(config.get("pad_is_special", True))
        tok = _FILE_TOKENIZERS[kind](model, source=str(model_path), special_ids=special)
    else:
        raise ValueError(f"{config_path}: unknown tokenizer type {kind!r}; "
                         f"available: {', '.join(_NAMES)}")
    if config.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise ValueError(f"{config_path}: vocab_size {config.get('vocab_size')} was saved, "
                         f"the model has {tok.vocab_size}")
    return tok


def get_tokenizer(name: str) -> ByteTokenizer:
    """The byte tokenizer (kept for callers that only know data.tokenizer="byte").

    Tokenizers with a file need `load_tokenizer(data_cfg)`.
    """
    if name == "byte":
        return ByteTokenizer()
    if name in _FILE_TOKENIZERS:
        raise ValueError(f"tokenizer {name!r} needs data.tokenizer_path: use "
                         f"load_tokenizer(data_cfg)")
    raise ValueError(f"unknown tokenizer {name!r}; available: {', '.join(_NAMES)}")


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (embedding rows that shard evenly)."""
    if vocab_size < 0 or multiple < 1:
        raise ValueError(f"need vocab_size >= 0 and multiple >= 1, got {vocab_size}, {multiple}")
    return -(-vocab_size // multiple) * multiple


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


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes `data` to a temporary file next to `path`, then renames it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("data.tokenizer='sentencepiece' needs the sentencepiece package: "
                          "pip install sentencepiece") from e
    return sentencepiece


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("data.tokenizer='hf' needs the Hugging Face tokenizers package: "
                          "pip install 'jaxlm[hf]'") from e
    return tokenizers
