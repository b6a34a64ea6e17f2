"""Tokenizers. Only a byte-level one: no vocabulary file to ship, download or version."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids: byte b -> id b + 3."""

    vocab_size: int = 259
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    _offset: int = 3

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as int32 ids, without BOS/EOS."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Ids of already-encoded UTF-8 bytes (TFDS Text features decode to bytes)."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self._offset

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= self._offset) & (ids < self.vocab_size)]
        return (ids - self._offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def get_tokenizer(name: str) -> ByteTokenizer:
    """The tokenizer called `name` (config key data.tokenizer)."""
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; available: 'byte'")
