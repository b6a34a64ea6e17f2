"""Shared by the source kinds: errors, split names, building, build statistics."""

from __future__ import annotations

from typing import Any

from jaxlm import console
from jaxlm.errors import UserError

SPLITS = ("train", "validation")


class SourceError(UserError, ValueError):
    """A source's files or settings are unusable; the message names the source and the file,
    line, field or config key at fault."""


class NotPreparedError(UserError, FileNotFoundError, ValueError):
    """A TFDS catalog dataset is not prepared under data_dir (jaxlm never downloads)."""


def stats(info: Any, train_split: str, eval_split: str, *, empty_skipped: int = 0,
          invalid_utf8_replaced: int = 0, long_documents_split: int = 0) -> dict[str, int]:
    """The JSON-safe build statistics `prepare` returns."""
    return {
        "train_documents": int(info.splits[train_split].num_examples),
        "validation_documents": int(info.splits[eval_split].num_examples),
        "empty_skipped": int(empty_skipped),
        "invalid_utf8_replaced": int(invalid_utf8_replaced),
        "long_documents_split": int(long_documents_split),
    }


def build(builder: Any) -> None:
    """Writes a TFDS builder's splits (ArrayRecord). TFDS's announcements and progress bars
    are held back (jaxlm.console): they say "Downloading and preparing dataset Unknown
    size" although nothing is downloaded."""
    with console.python_output_held():
        builder.download_and_prepare()
