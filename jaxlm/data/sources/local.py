"""User corpora from local files (kind text, jsonl or parquet), built into TFDS ArrayRecord.

Each build lives in `data_dir/jaxlm_local/<name>-<digest>/1.0.0/`, where the digest covers
the source's settings and every matched file's path, size and mtime: editing a file or the
config gives a fresh build, and two sources never share one. Older builds are left in place.

Documents are keyed by (file path relative to the files' common directory, index within the
file); `validation` holds those whose stable hash falls under `eval_fraction`, plus one
document chosen by hash if that would leave it empty (and symmetrically for `train`).

A document longer than `data.max_document_bytes` (UTF-8 bytes) is stored as pieces of at most
that size (jaxlm.data.longdocs), each a record keyed "<path>#<index>.<piece>" (the first
"<path>#<index>") with the document's path and index; all pieces go to the document's split.
Files are read in bounded memory: a text file or block in parts, an over-long JSONL line as a
stream, a Parquet value from Arrow's buffer. The limit counts in the digest only when a file
could hold a longer document, so builds of other corpora are the ones made before it existed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.config.schema import DEFAULT_MAX_DOCUMENT_BYTES
from jaxlm.data import jsonl, longdocs
from jaxlm.data.sources._common import SourceError, build, stats

# Bump when the same files and settings would now build different records.
_BUILD_FORMAT = 1
_GLOB_MAGIC = re.compile(r"[*?[]")
_STATS_KEY = "jaxlm_build_stats"

# (index within file, piece of the document (0 unless it was split), text or None for a null
# value, whether invalid UTF-8 was replaced)
Document = tuple[int, int, "str | None", bool]


@dataclasses.dataclass(eq=False)
class LocalConfig(tfds.core.BuilderConfig):
    """One user source resolved to its files; `name` is "<source>-<digest>"."""

    source: str = ""
    kind: str = "text"
    files: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    text_field: str = "text"
    split_by: str = "file"
    eval_fraction: float = 0.01
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES  # data.max_document_bytes
    plan: Any = dataclasses.field(default=None, repr=False)  # a _Plan once scanned


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one pass over every document decided, before anything is written."""

    documents: int  # non-empty
    empty_skipped: int
    invalid_utf8_replaced: int
    long_documents_split: int
    validation_files: frozenset[str]
    to_validation: tuple[str, int] | None  # the fallback when no hash falls under the fraction
    to_train: tuple[str, int] | None  # the fallback when every hash does


# Configs by name, so that TFDS finds a config passed in as "known" instead of warning about
# (and printing) a custom one on every construction.
_CONFIGS: dict[str, LocalConfig] = {}


class LocalCorpus(tfds.core.GeneratorBasedBuilder):
    """A user's local files, one document per file, blank-line block, JSONL line or row."""

    name = "jaxlm_local"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None  # see Stdlib: no checksums file, no importlib_resources backport

    @classmethod
    def get_builder_config(cls, name: str, version: Any = None) -> LocalConfig | None:
        del version
        return _CONFIGS.get(name)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A jaxlm data.sources entry built from local files.",
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "path": tfds.features.Text(),  # relative to the files' common directory
                "index": tfds.features.Scalar(np.int64),  # document number within the file
            }),
            # Saved as metadata.json inside the build, so it is as atomic as the data.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        cfg = self.builder_config
        plan = cfg.plan if cfg.plan is not None else scan(cfg)
        self.info.metadata[_STATS_KEY] = {
            "empty_skipped": plan.empty_skipped,
            "invalid_utf8_replaced": plan.invalid_utf8_replaced,
            "long_documents_split": plan.long_documents_split,
        }
        return {"train": self._generate_examples(plan, validation=False),
                "validation": self._generate_examples(plan, validation=True)}

    def _generate_examples(self, plan: _Plan, validation: bool) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        for relpath, path in cfg.files:
            if validation and relpath not in plan.validation_files:
                continue
            for index, piece, text, _ in documents(cfg, relpath, path):
                if text is None or not text.strip():
                    continue
                if _in_validation(cfg, plan, relpath, index) == validation:
                    key = f"{relpath}#{index}" + (f".{piece}" if piece else "")
                    yield key, {"text": text, "path": relpath, "index": index}


# ---- resolving a source's files -------------------------------------------------------------

def resolve(name: str, spec: Any, max_document_bytes: int) -> LocalConfig:
    """The source's files (checked readable) and the config naming its build."""
    files = _expand(name, spec.paths)
    root = os.path.commonpath([os.path.dirname(p) for p in files])
    entries = sorted((os.path.relpath(p, root).replace(os.sep, "/"), p) for p in files)
    payload: dict[str, Any] = {
        "format": _BUILD_FORMAT, "source": name, "kind": spec.kind,
        "eval_fraction": float(spec.eval_fraction), "files": []}
    if spec.kind == "text":
        payload["split_by"] = spec.split_by
    else:
        payload["text_field"] = spec.text_field
    for relpath, path in entries:
        st = os.stat(path)
        payload["files"].append([relpath, path, st.st_size, st.st_mtime_ns])
    if any(_may_exceed(spec, path, max_document_bytes) for _, path in entries):
        payload["max_document_bytes"] = int(max_document_bytes)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.]+", "_", name)[:48] or "source"
    cfg = LocalConfig(
        name=f"{safe}-{digest}", description=f"data.sources.{name}", source=name,
        kind=spec.kind, files=tuple(entries), text_field=spec.text_field,
        split_by=spec.split_by, eval_fraction=float(spec.eval_fraction),
        max_document_bytes=int(max_document_bytes))
    _CONFIGS[cfg.name] = cfg
    return cfg


def _expand(name: str, paths: str) -> list[str]:
    """Absolute paths of every file the comma-separated files/globs match, deduplicated."""
    key = f"data.sources.{name}.paths"
    patterns = [p.strip() for p in str(paths).split(",") if p.strip()]
    if not patterns:
        raise SourceError(f"{key}: no files or globs given")
    found, seen = [], set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if _GLOB_MAGIC.search(expanded):
            # `**` matches any depth; hidden files and directories are not matched.
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        else:
            matches = [expanded] if os.path.exists(expanded) else []
        if not matches:
            raise SourceError(f"{key}: {pattern!r} matches no files")
        for match in matches:
            path = os.path.abspath(match)
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                found.append(path)
    for path in found:
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise SourceError(f"{key}: cannot read {path}: {e.strerror or e}") from e
    return found


# ---- reading documents ------------------------------------------------------------------------

def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def documents(cfg: LocalConfig, relpath: str, path: str) -> Iterator[Document]:
    """Every document of one file, empty ones included, in file order; one longer than
    cfg.max_document_bytes as its pieces."""
    try:
        if cfg.kind == "text":
            yield from _text_documents(path, cfg.split_by, cfg.max_document_bytes)
        elif cfg.kind == "jsonl":
            yield from _jsonl_documents(cfg, path)
        elif cfg.kind == "parquet":
            yield from _parquet_documents(cfg, path)
        else:
            raise SourceError(f"data.sources.{cfg.source}.kind: {cfg.kind!r} is not a local kind")
    except OSError as e:
        raise SourceError(f"data.sources.{cfg.source}: cannot read {path}: {e}") from e


def _text_documents(path: str, split_by: str, limit: int) -> Iterator[Document]:
    with open(path, "rb") as f:
        start = len(jsonl.BOM) if f.read(len(jsonl.BOM)) == jsonl.BOM else 0
        f.seek(start)
        if split_by == "file":
            count = 0
            for count, data in enumerate(longdocs.read_pieces(f, limit), start=1):
                yield (0, count - 1, *_decode(data))
            if not count:
                yield 0, 0, "", False  # an empty file: one empty document
            return

        def reread(begin: int, end: int) -> Iterator[bytes]:
            """Bytes [begin, end) after the BOM, in parts."""
            with open(path, "rb") as again:
                again.seek(start + begin)
                while begin < end:
                    part = again.read(min(longdocs.READ_BYTES, end - begin))
                    if not part:
                        raise OSError(f"{path} became shorter while it was read")
                    begin += len(part)
                    yield part

        # Blocks of non-blank lines; a line holding only whitespace is blank.
        for index, piece, data in longdocs.blank_line_blocks(f, reread, limit):
            yield (index, piece, *_decode(data))


def _jsonl_documents(cfg: LocalConfig, path: str) -> Iterator[Document]:
    field, limit = cfg.text_field, cfg.max_document_bytes

    def where(lineno: int) -> str:
        return f"{path}, line {lineno} (data.sources.{cfg.source})"

    with open(path, "rb") as f:
        index = lineno = 0
        while raw := f.readline(limit + 1):  # a line, or its first limit + 1 bytes
            lineno += 1
            if not raw.endswith(b"\n") and len(raw) > limit:
                found = False  # a blank line is no document
                for document in _long_jsonl_line(cfg, f, raw, lineno, index, where(lineno)):
                    found = True
                    yield document
                index += found
                continue
            parsed = jsonl.parse_line(raw, lineno, SourceError, where)
            if parsed is None:
                continue
            record, replaced = parsed
            if field not in record:
                raise SourceError(f"{where(lineno)}: no field {field!r} "
                                  f"(data.sources.{cfg.source}.text_field)")
            value = record[field]
            if value is None:
                yield index, 0, None, replaced
            elif not isinstance(value, str):
                raise SourceError(f"{where(lineno)}: field {field!r} is a "
                                  f"{type(value).__name__}, not a string")
            else:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
                    value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                    replaced = True
                yield index, 0, value, replaced
            index += 1


def _long_jsonl_line(cfg: LocalConfig, f: Any, head: bytes, lineno: int, index: int,
                     where: str) -> Iterator[Document]:
    """The document (its pieces) of one JSONL line longer than the limit, whose first bytes
    `head` were read from `f`: read as a stream. Nothing for a blank line."""
    head = head.removeprefix(jsonl.BOM) if lineno == 1 else head
    line = longdocs.LongJsonLine(f, head, cfg.text_field, cfg.max_document_bytes)
    piece = -1
    try:
        for piece, text in enumerate(line.pieces()):
            yield index, piece, text, line.replaced
    except longdocs.DocumentError as e:
        detail = f" (data.sources.{cfg.source}.text_field)" if "no field" in str(e) else ""
        raise SourceError(f"{where}: {e}{detail}") from None
    if line.null:
        yield index, 0, None, line.replaced
    elif piece < 0 and not line.blank:  # an empty string
        yield index, 0, "", line.replaced


def _parquet_documents(cfg: LocalConfig, path: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    field, limit = cfg.text_field, cfg.max_document_bytes
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except pa.ArrowException as e:
        raise SourceError(f"data.sources.{cfg.source}: cannot read {path} as Parquet: {e}") from e
    if field not in schema.names:
        raise SourceError(f"{path} (data.sources.{cfg.source}): no column {field!r} "
                          f"(data.sources.{cfg.source}.text_field); columns: {schema.names}")
    kind = schema.field(field).type
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        as_bytes = pa.binary()
    elif pa.types.is_large_string(kind) or pa.types.is_large_binary(kind):
        as_bytes = pa.large_binary()
    else:
        raise SourceError(f"{path} (data.sources.{cfg.source}): column {field!r} holds {kind}, "
                          f"not strings")
    index = 0
    try:
        for batch in parquet.iter_batches(columns=[field], batch_size=4096):
            # As bytes: decoded here, so invalid UTF-8 is replaced and counted like elsewhere.
            column = batch.column(0).cast(as_bytes)
            if (pc.max(pc.binary_length(column)).as_py() or 0) <= limit:  # the common case
                for value in column.to_pylist():
                    yield (index, 0, None, False) if value is None else (index, 0, *_decode(value))
                    index += 1
                continue
            for value in column:
                if not value.is_valid:
                    yield index, 0, None, False
                else:  # from Arrow's buffer, a part at a time: never a whole second copy
                    for piece, data in enumerate(_buffer_pieces(value.as_buffer(), limit)):
                        yield (index, piece, *_decode(data))
                index += 1
    except pa.ArrowException as e:
        raise SourceError(f"data.sources.{cfg.source}: cannot read {path} as Parquet: {e}") from e


def _buffer_pieces(buffer: Any, limit: int) -> Iterator[bytes]:
    view = memoryview(buffer)
    if len(view) <= limit:
        yield view.tobytes()
        return
    cutter = longdocs.Cutter(limit)
    for start in range(0, len(view), longdocs.READ_BYTES):
        yield from cutter.feed(view[start:start + longdocs.READ_BYTES].tobytes())
    yield from cutter.finish()


def _may_exceed(spec: Any, path: str, limit: int) -> bool:
    """Whether a file could hold a document longer than `limit` bytes: a text or JSONL file
    longer than that (JSON's escapes only shorten text), a Parquet file whose text column
    takes more than that uncompressed in one row group (or that cannot be read as Parquet:
    then the build's scan names the problem)."""
    if spec.kind != "parquet":
        return os.path.getsize(path) > limit
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        return any(column.path_in_schema == spec.text_field
                   and column.total_uncompressed_size > limit
                   for group in range(meta.num_row_groups)
                   for column in (meta.row_group(group).column(j)
                                  for j in range(meta.num_columns)))
    except (pa.ArrowException, OSError):
        return True


# ---- the held-out split -----------------------------------------------------------------------

def document_hash(relpath: str, index: int) -> float:
    """The stable hash in [0, 1) of a document that the held-out split compares with
    eval_fraction (the lowest goes to validation when none falls under it)."""
    digest = hashlib.sha256(f"{relpath}\0{index}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _in_validation(cfg: LocalConfig, plan: _Plan, relpath: str, index: int) -> bool:
    key = (relpath, index)
    if key == plan.to_train:
        return False
    return key == plan.to_validation or document_hash(relpath, index) < cfg.eval_fraction


def scan(cfg: LocalConfig) -> _Plan:
    """Reads every document once: input errors surface before anything is written. Counts
    are of documents, but `empty_skipped` counts records (a blank piece of a split document
    too); the held-out split is decided per document, so a split one's pieces stay together."""
    count = empty = replaced_docs = split = held_out = 0
    validation_files: set[str] = set()
    lowest = highest = None  # (hash, relpath, index) of the non-empty documents
    last = last_split = last_replaced = None  # (relpath, index) of the latest such document
    for relpath, path in cfg.files:
        for index, piece, text, replaced in documents(cfg, relpath, path):
            if text is None or not text.strip():
                empty += 1
                continue
            key = (relpath, index)
            if piece and key != last_split:
                split, last_split = split + 1, key
            if replaced and key != last_replaced:
                replaced_docs, last_replaced = replaced_docs + 1, key
            if key == last:
                continue  # another piece of the same document
            count, last = count + 1, key
            h = (document_hash(relpath, index), relpath, index)
            lowest = h if lowest is None else min(lowest, h)
            highest = h if highest is None else max(highest, h)
            if h[0] < cfg.eval_fraction:
                held_out += 1
                validation_files.add(relpath)
    if count < 2:
        raise SourceError(
            f"data.sources.{cfg.source}: {count} non-empty document(s) in "
            f"{len(cfg.files)} file(s) ({empty} empty skipped); at least 2 are needed, "
            f"one of them held out for validation")
    to_validation = to_train = None
    if held_out == 0:
        to_validation = lowest[1:]
        validation_files.add(lowest[1])
    elif held_out == count:
        to_train = highest[1:]
    return _Plan(count, empty, replaced_docs, split, frozenset(validation_files),
                 to_validation, to_train)


# ---- entry points -----------------------------------------------------------------------------

def _builder(cfg: LocalConfig, data_dir: str) -> LocalCorpus:
    return LocalCorpus(config=cfg.name, data_dir=data_dir, file_format="array_record")


def prepare(name: str, spec: Any, data_dir: str, max_document_bytes: int) -> dict[str, int]:
    cfg = resolve(name, spec, max_document_bytes)
    builder = _builder(cfg, data_dir)
    if not builder.is_prepared():
        cfg.plan = scan(cfg)
        # Written into an `incomplete.*` directory, renamed when complete.
        build(builder)
    saved = builder.info.metadata.get(_STATS_KEY, {})
    return stats(builder.info, "train", "validation",
                 empty_skipped=saved.get("empty_skipped", 0),
                 invalid_utf8_replaced=saved.get("invalid_utf8_replaced", 0),
                 long_documents_split=saved.get("long_documents_split", 0))


def load(name: str, spec: Any, data_dir: str, split: str, max_document_bytes: int) -> Any:
    """Records {"text": bytes, "path": bytes, "index": int}."""
    cfg = resolve(name, spec, max_document_bytes)
    builder = _builder(cfg, data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"source {name!r} is not built under {data_dir} for its current files and "
            f"settings (build {LocalCorpus.name}/{cfg.name}); run "
            f"jaxlm.data.sources.prepare(data_cfg, {name!r}) first")
    return builder.as_data_source(split=split)
