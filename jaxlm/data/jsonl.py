"""JSON Lines: one JSON object per line, read a line at a time, with errors that name the
file and line.

Both readers of JSONL in jaxlm use this: corpus sources (jaxlm.data.sources.local) and
fine-tuning examples (jaxlm.finetune.records). A byte-order mark before the first line is
dropped and blank lines are skipped; a line that is not a JSON object is an error of the
caller's type naming `where(line number)`. Invalid UTF-8 is replaced (and reported to the
caller, which counts it) or refused, as the caller asks. `parse_line` is one line's part of
this, for a reader that reads its own lines (a corpus source reads a line longer than
data.max_document_bytes as a stream: jaxlm.data.longdocs).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

BOM = b"\xef\xbb\xbf"


def objects(path: str | os.PathLike, error: Callable[[str], Exception],
            where: Callable[[int], str], strict_utf8: bool = False
            ) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """(line number, object, whether invalid UTF-8 was replaced) of every non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):  # binary lines: split on b"\n" only
            parsed = parse_line(raw, lineno, error, where, strict_utf8)
            if parsed is not None:
                yield lineno, *parsed


def parse_line(raw: bytes, lineno: int, error: Callable[[str], Exception],
               where: Callable[[int], str], strict_utf8: bool = False
               ) -> tuple[dict[str, Any], bool] | None:
    """(object, whether invalid UTF-8 was replaced) of line `lineno` (bytes, its b"\n"
    included or not); None for a blank line."""
    if lineno == 1:
        raw = raw.removeprefix(BOM)
    try:
        line, replaced = raw.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if strict_utf8:
            raise error(f"{where(lineno)}: not UTF-8 ({e.reason} at byte {e.start})") from None
        line, replaced = raw.decode("utf-8", errors="replace"), True
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where(lineno)}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(value, dict):
        raise error(f"{where(lineno)}: expected a JSON object, got {type(value).__name__}")
    return value, replaced
