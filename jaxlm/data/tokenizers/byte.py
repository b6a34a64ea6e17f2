"""The byte-level tokenizer: no model file, UTF-8 bytes shifted past pad/BOS/EOS."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxlm.data.tokenizers.base import SAVED_CONFIG, Tokenizer, _atomic_write, _json_bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past three special ids: byte b -> id b + 3."""

    name = "byte"
    vocab_size: int = 259
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    adds_bos: bool = True  # every sequence jaxlm has trained with it starts with BOS
    fingerprint = "byte"
    _offset: int = 3

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as int32 ids, without BOS/EOS."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Ids of the bytes themselves (no UTF-8 decoding: every byte string round-trips)."""
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        ids += self._offset  # in place: one int32 copy of the text, not two
        return ids

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        ids = self._kept_ids(ids)
        ids = ids[ids >= self._offset]
        return (ids - self._offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / SAVED_CONFIG, _json_bytes(self._saved_config()))
