"""The `Tokenizer` interface, the file-backed base class and helpers shared by every kind.

`_FileTokenizer` is a tokenizer rebuilt from the bytes of one model file (SentencePiece,
Hugging Face); `save` writes `SAVED_CONFIG` with `_atomic_write`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

#: File `save` writes into its directory, naming the tokenizer's type and model file.
SAVED_CONFIG = "jaxlm_tokenizer.json"
_SAVED_FORMAT = 1


class Tokenizer(abc.ABC):
    """What the pipeline and generation use. Ids are in [0, vocab_size)."""

    name: str  # "byte", "sentencepiece" or "hf" (the value of data.tokenizer)
    vocab_size: int  # number of ids the tokenizer can emit (its largest id + 1)
    pad_id: int
    bos_id: int | None  # None: the tokenizer has none
    eos_id: int | None
    # Whether a sequence (a training document, a prompt, a scored context) starts with BOS:
    # the one convention the pipeline, generation and scoring ask (never bos_id alone).
    adds_bos: bool
    fingerprint: str  # sha256 of the model file ("byte" for ByteTokenizer)
    # Masked LM's mask token ([MASK], <mask>); None: the tokenizer has none (the pipeline
    # then takes an id above the tokenizer's, jaxlm.data.objectives).
    mask_id: int | None = None
    # Span corruption's sentinels <extra_id_0>, <extra_id_1>, ... in that order (T5's count
    # down from the top of its vocabulary); empty: the tokenizer has none.
    sentinels: tuple[int, ...] = ()
    _pad_is_special: bool = True  # pad_id is a real special token (not only the fallback 0)

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

    @property
    def decoder_start_id(self) -> int:
        """What an encoder-decoder's decoder input starts with: the pad id, as T5's."""
        return self.pad_id

    def sentinel_ids(self, n: int) -> list[int]:
        """The ids of <extra_id_0> ... <extra_id_{n-1}>; ValueError if it has fewer."""
        if not 0 <= n <= len(self.sentinels):
            raise ValueError(f"the tokenizer has {len(self.sentinels)} sentinel tokens "
                             f"(<extra_id_N>), {n} are needed")
        return list(self.sentinels[:n])

    def special_ids(self) -> list[int]:
        """Every id that is not text, sorted: pad (when a real pad token), BOS, EOS, mask,
        sentinels and the kind's own control tokens. Masked LM never selects these for
        prediction nor draws them as random replacements."""
        ids = {self.bos_id, self.eos_id, self.mask_id, *self.sentinels, *self._own_special_ids()}
        if self._pad_is_special:
            ids.add(self.pad_id)
        return sorted(int(i) for i in ids if i is not None)

    def _own_special_ids(self) -> list[int]:
        """The kind's special tokens beyond pad/BOS/EOS/mask/sentinels."""
        return []

    def _skipped_ids(self) -> list[int]:
        return [i for i in (self.bos_id, self.eos_id) if i is not None]

    def _kept_ids(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        if not isinstance(ids, (np.ndarray, list, tuple)):
            ids = list(ids)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        keep = (ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._skipped_ids())
        return ids[keep]

    def start_ids(self) -> list[int]:
        """What a sequence starts with: [bos_id] when `adds_bos`, else nothing."""
        return [self.bos_id] if self.adds_bos and self.bos_id is not None else []

    def end_ids(self) -> list[int]:
        """What a document ends with: [eos_id] when the tokenizer has one (it separates
        packed documents)."""
        return [] if self.eos_id is None else [self.eos_id]

    def document(self, ids: np.ndarray) -> np.ndarray:
        """A document's ids as training sees them, int32: start_ids() + ids + end_ids()."""
        start, end = self.start_ids(), self.end_ids()
        tokens = np.empty(len(start) + len(ids) + len(end), np.int32)
        tokens[:len(start)] = start
        tokens[len(start):len(start) + len(ids)] = ids
        tokens[len(start) + len(ids):] = end
        return tokens

    def _saved_config(self, **extra: Any) -> dict[str, Any]:
        return {"type": self.name, "format": _SAVED_FORMAT, **extra,
                "vocab_size": int(self.vocab_size), "pad_id": self.pad_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "adds_bos": bool(self.adds_bos),
                # Only when there is one: the saves of tokenizers without stay as they were.
                **({} if self.mask_id is None else {"mask_id": int(self.mask_id)})}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, adds_bos={self.adds_bos})")


class _FileTokenizer(Tokenizer):
    """A tokenizer rebuilt from the bytes of one model file (kept for `save` and pickling)."""

    file_name: str
    alt_file_names: tuple[str, ...] = ()  # other names of the model file in a directory

    def __init__(self, model: bytes, *, source: str = "<bytes>",
                 special_ids: dict[str, int | None] | None = None,
                 adds_bos: bool | None = None):
        """`special_ids`: the pad/bos/eos (and mask, when given) ids to use (default: the
        module's rules); `adds_bos`: the BOS convention to use (default: what the model file
        says, after the special ids are settled)."""
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
        self.mask_id = self._file_mask_id()
        if special_ids is not None and "mask_id" in special_ids:
            self.mask_id = special_ids["mask_id"]
            if not (self.mask_id is None or isinstance(self.mask_id, int)
                    and 0 <= self.mask_id < self.vocab_size):
                raise ValueError(f"{source}: mask_id={self.mask_id!r} is not an id of this "
                                 f"tokenizer (vocab_size {self.vocab_size})")
        self.sentinels = tuple(int(i) for i in self._file_sentinels())
        self.adds_bos = self._file_adds_bos() if adds_bos is None else adds_bos
        if not isinstance(self.adds_bos, bool) or self.adds_bos and bos is None:
            raise ValueError(f"{source}: adds_bos={self.adds_bos!r} needs to be true or false, "
                             f"and false without a bos_id")

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> _FileTokenizer:
        """Reads `path`; ValueError naming it if it is not a model of this kind. `options`
        (the kind's constructor keywords) default to what the files beside it say
        (`_options_beside`)."""
        path = Path(os.path.expanduser(str(path)))
        options = options or cls._options_beside(path)
        return cls(path.read_bytes(), source=str(path), **options)

    @classmethod
    def _options_beside(cls, path: Path) -> dict[str, Any]:
        """Constructor keywords that files next to the model file imply (default: none)."""
        return {}

    @abc.abstractmethod
    def _load(self, model: bytes, source: str) -> None:
        """Builds the backend; raises ValueError naming `source` for an invalid model."""

    @abc.abstractmethod
    def _special_ids(self) -> tuple[int, int | None, int | None, bool]:
        """(pad, bos, eos, whether pad is a real special token) by the module's rules."""

    def _file_mask_id(self) -> int | None:
        """The model file's mask token, by the module's rules (default: none)."""
        return None

    def _file_sentinels(self) -> list[int]:
        """The model file's <extra_id_0>, <extra_id_1>, ... ids (default: none)."""
        return []

    def _options(self) -> dict[str, Any]:
        """Constructor keywords beyond the model bytes that change the ids (saved, pickled)."""
        return {}

    @classmethod
    def _saved_options(cls, config: dict[str, Any], config_path: Path) -> dict[str, Any]:
        """`_options()` from a saved `SAVED_CONFIG` (checked)."""
        return {}

    def _file_adds_bos(self) -> bool:
        """Whether the model file's own convention starts a sequence with `bos_id`
        (default: whenever there is one, as SentencePiece/Llama tokenizers do)."""
        return self.bos_id is not None

    def _skipped_ids(self) -> list[int]:
        skipped = super()._skipped_ids()
        return skipped + [self.pad_id] if self._pad_is_special else skipped

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / self.file_name, self._model)
        config = self._saved_config(file=self.file_name, sha256=self.fingerprint,
                                    pad_is_special=self._pad_is_special, **self._options())
        _atomic_write(directory / SAVED_CONFIG, _json_bytes(config))  # last: marks complete

    def __reduce__(self):  # threads or processes of a data loader may pickle it
        special = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
                   "mask_id": self.mask_id, "pad_is_special": self._pad_is_special,
                   "adds_bos": self.adds_bos}
        return _rebuild, (type(self), self._model, self._source, special, self._options())

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, source={self._source!r})"


def _rebuild(cls: type[_FileTokenizer], model: bytes, source: str,
             special: dict[str, Any], options: dict[str, Any] | None = None) -> _FileTokenizer:
    # Pickles made before adds_bos existed: jaxlm then started every sequence with its BOS.
    adds_bos = special.get("adds_bos", special["bos_id"] is not None)
    return cls(model, source=source, special_ids=special, adds_bos=adds_bos, **(options or {}))


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (embedding rows that shard evenly)."""
    if vocab_size < 0 or multiple < 1:
        raise ValueError(f"need vocab_size >= 0 and multiple >= 1, got {vocab_size}, {multiple}")
    return -(-vocab_size // multiple) * multiple


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
