"""Documents longer than `data.max_document_bytes`: where they are cut, and reading them in
bounded memory.

A document of at most `limit` UTF-8 bytes is never touched. A longer one is cut into pieces
of at most `limit` bytes, each then its own document (the pipeline wraps each in BOS ... EOS):
a piece ends after the last newline in the second half of its `limit` bytes, or else at the
last UTF-8 character boundary at or before `limit` bytes. The cut points depend only on the
bytes, never on how they were read, so a local build (jaxlm.data.sources.local) and the
pipeline (a catalog record, `SplitRecord`) cut a text alike, and the pieces joined are the
document.

Readers that never hold more than about `limit` + `READ_BYTES` bytes of one document:
    `read_pieces`        a file's bytes (text sources, split_by="file")
    `blank_line_blocks`  a file's blocks of non-blank lines (split_by="blank_line")
    `LongJsonLine`       one JSONL line longer than `limit`: its text field, streamed
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np

READ_BYTES = 1 << 20  # a read from a file
_SEGMENT_BYTES = 1 << 20  # escaped JSON text decoded at a time
_CAPTURE_BYTES = 1 << 20  # a skipped JSON value up to this size is checked by `json`
_ASCII_SPACE = b" \t\n\r\x0b\x0c"  # what bytes.strip() strips


class DocumentError(ValueError):
    """An over-long JSONL line that is not a valid record; the caller names file and line."""


# ---- cutting ----------------------------------------------------------------------------------

def _cut(buf: bytes | bytearray, start: int, limit: int) -> int:
    """The end of the piece that starts at `start`, for len(buf) - start > limit."""
    newline = buf.rfind(b"\n", start + limit // 2, start + limit)
    if newline >= 0:
        return newline + 1
    for end in range(start + limit, start + limit - 4, -1):
        if buf[end] & 0xC0 != 0x80:  # not a UTF-8 continuation byte
            return end
    return start + limit  # not UTF-8 here: any cut will do


def spans(data: bytes, limit: int) -> list[tuple[int, int]]:
    """[start, end) of the pieces of `data`; one span when len(data) <= limit."""
    found, start = [], 0
    while len(data) - start > limit:
        end = _cut(data, start, limit)
        found.append((start, end))
        start = end
    if start < len(data) or not found:
        found.append((start, len(data)))
    return found


class Cutter:
    """Pieces of a document fed in parts: `feed` yields each piece once it is decided,
    `finish` the last. Holds at most `limit` bytes plus the part being fed."""

    def __init__(self, limit: int):
        if limit < 4:
            raise ValueError(f"a piece must hold a UTF-8 character: limit {limit} < 4")
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buf += data
        while len(self._buf) > self.limit:
            end = _cut(self._buf, 0, self.limit)
            yield bytes(self._buf[:end])
            del self._buf[:end]

    def finish(self) -> Iterator[bytes]:
        if self._buf:
            yield bytes(self._buf)
        self._buf = bytearray()


class SplitRecord:
    """A record longer than the limit, tokenized one piece at a time: `len()` pieces, and
    `tokens(k)` gives piece k as `encode` gives a whole record."""

    def __init__(self, data: bytes, limit: int, encode: Callable[[bytes], np.ndarray]):
        self._data = data
        self._spans = spans(data, limit)
        self._encode = encode

    def __len__(self) -> int:
        return len(self._spans)

    def tokens(self, k: int) -> np.ndarray:
        start, end = self._spans[k]
        return self._encode(self._data[start:end])


# ---- text files -------------------------------------------------------------------------------

def read_pieces(f: BinaryIO, limit: int, read_bytes: int | None = None) -> Iterator[bytes]:
    """The pieces of the rest of file `f` as one document."""
    read_bytes = read_bytes or READ_BYTES
    cutter = Cutter(limit)
    while data := f.read(read_bytes):
        yield from cutter.feed(data)
    yield from cutter.finish()


def is_blank(line: bytes) -> bool:
    """Only whitespace: ASCII whitespace for an ASCII line, else Unicode whitespace once
    decoded (invalid UTF-8 is not whitespace)."""
    stripped = line.strip()
    return not stripped or (not stripped.isascii()
                            and not stripped.decode("utf-8", errors="replace").strip())


class _Blankness:
    """`is_blank` of a line read in parts."""

    def __init__(self):
        self._ascii = True
        self._ascii_space = True
        self._space = True
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, part: bytes, final: bool = False) -> None:
        self._ascii = self._ascii and part.isascii()
        self._ascii_space = self._ascii_space and not part.strip(_ASCII_SPACE)
        text = self._decoder.decode(part, final)
        self._space = self._space and (not text or text.isspace())

    @property
    def blank(self) -> bool:
        return self._ascii_space if self._ascii else self._space


def _lines(f: BinaryIO, read_bytes: int) -> Iterator[tuple[int, int, bytes | None, bool, bytes]]:
    """(start, end, content, blank, last byte) of every line of the rest of `f`, split on
    b"\\n" (offsets from where `f` stood; content None for a line longer than read_bytes)."""
    offset = 0
    while part := f.readline(read_bytes):
        if part.endswith(b"\n") or len(part) < read_bytes:
            content = part.removesuffix(b"\n")
            yield offset, offset + len(content), content, is_blank(content), content[-1:]
            offset += len(part)
            continue
        blankness, size, last, newline = _Blankness(), 0, b"", False
        while part:
            newline = part.endswith(b"\n")
            body = part.removesuffix(b"\n")
            blankness.feed(body)
            size += len(body)
            last = body[-1:] or last
            if newline:
                break
            part = f.readline(read_bytes)
        blankness.feed(b"", final=True)
        yield offset, offset + size, None, blankness.blank, last
        offset += size + newline


def blank_line_blocks(f: BinaryIO, reread: Callable[[int, int], Iterator[bytes]], limit: int,
                      read_bytes: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(block number, piece number, bytes) of the blocks of non-blank lines of the rest of
    `f`, each block's lines joined by b"\\n" without the last line's b"\\r". A block longer
    than `limit` is read again, through `reread(start, end)` (parts of the rest of the file
    from `start` to `end`), and cut."""
    index, start, end, last, block = 0, None, 0, b"", bytearray()
    for line_start, line_end, content, blank, line_last in _lines(f, read_bytes or READ_BYTES):
        if not blank:
            if start is None:
                start, block = line_start, bytearray()
            joined = line_start > start  # a line after the first: joined by b"\n"
            if block is not None and content is not None \
                    and len(block) + joined + len(content) <= limit + 1:
                block += b"\n" + content if joined else content
            else:
                block = None  # too long to hold: read again when the block ends
            end, last = line_end, line_last
            continue
        if start is not None:
            yield from _block_pieces(index, start, end, last, block, reread, limit)
            index, start = index + 1, None
    if start is not None:
        yield from _block_pieces(index, start, end, last, block, reread, limit)


def _block_pieces(index: int, start: int, end: int, last: bytes, block: bytearray | None,
                  reread: Callable[[int, int], Iterator[bytes]], limit: int
                  ) -> Iterator[tuple[int, int, bytes]]:
    if block is not None:
        parts = [bytes(block).removesuffix(b"\r")]
    else:
        parts = reread(start, end - (last == b"\r"))
    cutter = Cutter(limit)
    piece = 0
    for part in parts:
        for data in cutter.feed(part):
            yield index, piece, data
            piece += 1
    for data in cutter.finish():
        yield index, piece, data


# ---- one over-long JSONL line -----------------------------------------------------------------

# JSON string content: runs of plain characters and complete escapes (stops at the closing
# quote, at a backslash without a complete escape after it, or at a control character).
_STRING_BODY = re.compile(
    rb'[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*')
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_STRUCTURE = re.compile(rb'["{}\[\]]')
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_JSON_SPACE = re.compile(rb"[ \t\r]*")
_TYPE_OF = {ord("{"): "dict", ord("["): "list", ord('"'): "str", ord("t"): "bool",
            ord("f"): "bool", ord("n"): "NoneType", **{c: "number" for c in b"-0123456789"}}


def _kind(c: int | None) -> str:
    """The type of the JSON value that starts with byte `c`."""
    if c not in _TYPE_OF:
        raise DocumentError("not valid JSON: expected a value")
    return _TYPE_OF[c]


class LongJsonLine:
    """The rest of one JSONL line (its first `head` bytes already read from `f`), parsed as a
    stream: `pieces()` yields the pieces (str) of the string in top-level field `field`,
    then `null` says whether the field was null and `replaced` whether invalid UTF-8 or a
    lone surrogate was replaced; `blank` for a line of whitespace only. The text equals
    json.loads(line)[field]; the other fields are checked with `json` up to 1 MiB each, and
    only for structure beyond. Raises DocumentError for what json.loads would refuse, a
    missing or non-string field, or a field given twice."""

    def __init__(self, f: BinaryIO, head: bytes, field: str, limit: int,
                 read_bytes: int | None = None):
        self._f, self._read_bytes = f, read_bytes or READ_BYTES
        self._field, self._limit = field, limit
        self._ended = head.endswith(b"\n")  # (a line shorter than expected)
        self._buf, self._pos = head.removesuffix(b"\n"), 0
        self._capture: bytearray | None = None
        self._capture_from = 0
        self.null = self.replaced = self.blank = False

    # -- the buffer --
    def _more(self) -> bool:
        """Reads on into the buffer (keeping what is unread); False at the end of the line."""
        while not self._ended:
            part = self._f.readline(self._read_bytes)
            if not part or part.endswith(b"\n"):
                self._ended = True
                part = part.removesuffix(b"\n")
            if self._capture is not None:
                self._capture += self._buf[self._capture_from:self._pos]
                self._capture_from = 0
                if len(self._capture) > _CAPTURE_BYTES:
                    self._capture = None
            self._buf, self._pos = self._buf[self._pos:] + part, 0
            if part:
                return True
        return False

    def _peek(self) -> int | None:
        """The next byte that is not JSON whitespace; None at the end of the line."""
        while True:
            self._pos = _JSON_SPACE.match(self._buf, self._pos).end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._more():
                return None

    def _expect(self, chars: bytes, what: str) -> int:
        c = self._peek()
        if c is None or c not in chars:
            found = "the end of the line" if c is None else repr(chr(c))
            raise DocumentError(f"not valid JSON: expected {what}, found {found}")
        self._pos += 1
        return c

    # -- the record --
    def pieces(self) -> Iterator[str]:
        if not self._buf.strip(_ASCII_SPACE):
            while self._more():
                if self._buf[self._pos:].strip(_ASCII_SPACE):
                    break
                self._pos = len(self._buf)
            else:
                self.blank = True
                return
        first = self._peek()
        if first != ord("{"):
            raise DocumentError(f"expected a JSON object, got {_kind(first)}")
        self._pos += 1
        found = False
        if self._peek() == ord("}"):
            self._pos += 1
        else:
            while True:
                self._expect(b'"', "a key")
                key = self._small_string()
                self._expect(b":", "':'")
                if key == self._field:
                    if found:
                        raise DocumentError(f"field {self._field!r} is given twice")
                    found = True
                    yield from self._field_value()
                else:
                    self._skip_value()
                if self._expect(b",}", "',' or '}'") == ord("}"):
                    break
        if self._peek() is not None:
            raise DocumentError("not valid JSON: extra data after the object")
        if not found:
            raise DocumentError(f"no field {self._field!r}")

    def _field_value(self) -> Iterator[str]:
        c = self._peek()
        if c == ord('"'):
            self._pos += 1
            cutter, pending = Cutter(self._limit), bytearray()
            for raw in self._string_segments():
                pending += raw
                if len(pending) >= _SEGMENT_BYTES:
                    cut = _safe_end(pending)
                    for piece in cutter.feed(self._decode(pending[:cut])):
                        yield piece.decode("utf-8")
                    del pending[:cut]
            for piece in (*cutter.feed(self._decode(pending)), *cutter.finish()):
                yield piece.decode("utf-8")
            return
        if c == ord("n") and self._scalar() == b"null":
            self.null = True
            return
        raise DocumentError(f"field {self._field!r} is a {_kind(c)}, not a string")

    def _decode(self, raw: bytes | bytearray) -> bytes:
        """UTF-8 of escaped JSON string content that starts and ends between characters."""
        value = json.loads(f'"{self._text(raw)}"')
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800-style escape
            self.replaced = True
            return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode()

    def _text(self, raw: bytes | bytearray) -> str:
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self.replaced = True
            return bytes(raw).decode("utf-8", errors="replace")

    # -- strings and other values --
    def _string_segments(self) -> Iterator[bytes]:
        """The escaped content of the string whose opening quote was read, in segments that
        end between escapes (perhaps inside a UTF-8 character); consumes the closing quote."""
        while True:
            end = _STRING_BODY.match(self._buf, self._pos).end()
            if end > self._pos:
                yield self._buf[self._pos:end]
            self._pos = end
            if end < len(self._buf):
                c = self._buf[end]
                if c == ord('"'):
                    self._pos += 1
                    return
                if c == ord("\\") and len(self._buf) - end < 6 and self._more():
                    continue  # an escape cut by the end of the buffer
                what = "invalid escape" if c == ord("\\") else "invalid control character"
                raise DocumentError(f"not valid JSON: {what} in a string")
            if not self._more():
                raise DocumentError("not valid JSON: unterminated string")

    def _small_string(self) -> str:
        raw = bytearray()
        for segment in self._string_segments():
            raw += segment
            if len(raw) > self._limit:
                raise DocumentError(f"not valid JSON: a key longer than {self._limit} bytes")
        return json.loads(f'"{self._text(raw)}"')

    def _scalar(self) -> bytes:
        """A number, true, false or null (read on while it may continue)."""
        while True:
            match = _SCALAR.match(self._buf, self._pos)
            unread = len(self._buf) - self._pos
            if match is not None and match.end() < len(self._buf) or \
                    match is None and unread >= 5 or self._ended:
                break
            self._more()
        if match is None:
            raise DocumentError("not valid JSON: expected a value")
        self._pos = match.end()
        return match.group()

    def _skip_value(self) -> None:
        c = self._peek()
        self._capture, self._capture_from = bytearray(), self._pos
        if c == ord('"'):
            self._pos += 1
            for _ in self._string_segments():
                pass
        elif c in (ord("{"), ord("[")):
            self._skip_container()
        else:
            self._scalar()
        if self._capture is not None:
            raw = bytes(self._capture + self._buf[self._capture_from:self._pos])
            try:
                json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as e:
                raise DocumentError(f"not valid JSON: {e.msg}") from None
        self._capture = None

    def _skip_container(self) -> None:
        closing = {ord("{"): ord("}"), ord("["): ord("]")}
        stack = bytearray()
        while True:
            match = _STRUCTURE.search(self._buf, self._pos)
            if match is None:
                self._pos = len(self._buf)
                if not self._more():
                    raise DocumentError("not valid JSON: unterminated object or array")
                continue
            c = self._buf[match.start()]
            self._pos = match.end()
            if c == ord('"'):
                for _ in self._string_segments():
                    pass
            elif c in closing:
                stack.append(closing[c])
            elif not stack or stack.pop() != c:
                raise DocumentError(f"not valid JSON: unexpected {chr(c)!r}")
            if not stack:
                return


def _safe_end(pending: bytearray) -> int:
    """How much of escaped string content (which starts between characters) can be decoded
    alone: not a trailing incomplete UTF-8 character, nor a trailing high-surrogate escape
    whose low half may follow."""
    end = len(pending)
    lead = end - 1
    while lead > end - 4 and lead > 0 and pending[lead] & 0xC0 == 0x80:
        lead -= 1
    if end and pending[lead] >= 0xC0:
        needed = 2 if pending[lead] < 0xE0 else 3 if pending[lead] < 0xF0 else 4
        if end - lead < needed:
            return lead
    if _HIGH_SURROGATE.fullmatch(pending, end - 6) if end >= 6 else False:
        run = 0
        while end - 7 - run >= 0 and pending[end - 7 - run] == ord("\\"):
            run += 1
        if run % 2 == 0:  # the backslash opens an escape (it is not an escaped backslash)
            return end - 6
    return end
