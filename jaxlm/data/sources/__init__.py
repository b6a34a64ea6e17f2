"""Corpora as random-access sources, read from TFDS ArrayRecord without TensorFlow.

A source is named by `data.dataset` (alone or in a mixture):

    "stdlib"             built in: this Python's standard-library sources
    data.sources.NAME    kind text | jsonl | parquet: local files, built here into TFDS
                         ArrayRecord under data.data_dir (see `local`);
                         kind tfds: a TFDS dataset already prepared there (see `catalog`)

    stats = prepare(data_cfg, name)        # builds if needed; build statistics
    stats = prepare_all(data_cfg)          # every source of the mixture, once per run
    source = load(data_cfg, name, split)   # split "train" | "validation"
    source[i]["text"]                      # bytes (UTF-8)

ArrayRecord gives random access (len + __getitem__), which grain needs for global shuffling,
host sharding and cheap checkpointing (a state is just an index).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import ml_collections

from jaxlm import config as config_lib
from jaxlm.config.schema import DEFAULT_MAX_DOCUMENT_BYTES
from jaxlm.data.sources import catalog, local, stdlib
from jaxlm.data.sources._common import SPLITS, NotPreparedError, SourceError
from jaxlm.data.sources.stdlib import Stdlib, stdlib_files

__all__ = ["NotPreparedError", "SourceError", "Stdlib", "documents", "load",
           "max_document_bytes", "prepare", "prepare_all", "stdlib_files"]

_BUILDERS = {"stdlib": Stdlib}  # the built-in sources (config.BUILTIN_DATASETS)


def max_document_bytes(data_cfg: ml_collections.ConfigDict) -> int:
    """data.max_document_bytes (its default for a config from before the key existed)."""
    return int(data_cfg.get("max_document_bytes", DEFAULT_MAX_DOCUMENT_BYTES))


def _data_dir(data_cfg: ml_collections.ConfigDict) -> str:
    data_dir = os.path.expanduser(data_cfg.data_dir)
    return data_dir if "://" in data_dir else os.path.abspath(data_dir)  # gs://... as is


def _spec(data_cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict | None:
    """The source's settings over `config.source_defaults()`; None for a built-in source."""
    if name in _BUILDERS:
        return None
    user = data_cfg.get("sources") or {}
    if name not in user:
        raise ValueError(f"unknown source {name!r}: neither built in {sorted(_BUILDERS)} nor "
                         f"defined in data.sources {sorted(user)}")
    spec = config_lib.source_defaults()
    for key, value in dict(user[name]).items():
        if key not in spec:
            raise SourceError(f"unknown config key: data.sources.{name}.{key}")
        spec[key] = value
    if spec.kind not in config_lib.SOURCE_KINDS:
        raise SourceError(f"data.sources.{name}.kind: {spec.kind!r} not in "
                          f"{config_lib.SOURCE_KINDS}")
    if spec.kind != "tfds" and not 0 < spec.eval_fraction < 1:
        raise SourceError(f"data.sources.{name}.eval_fraction: must be in (0, 1)")
    if spec.kind == "text" and spec.split_by not in ("file", "blank_line"):
        raise SourceError(f"data.sources.{name}.split_by: {spec.split_by!r} not in "
                          f"('file', 'blank_line')")
    return spec


def prepare(data_cfg: ml_collections.ConfigDict, name: str) -> dict[str, int]:
    """Builds source `name` under `data_cfg.data_dir` unless already built, and returns its
    build statistics: {"train_documents", "validation_documents", "empty_skipped",
    "invalid_utf8_replaced", "long_documents_split"} (ints; the same on later calls, which
    do not rebuild). Records are counted: a document longer than data.max_document_bytes
    is split into pieces (jaxlm.data.longdocs), each a record; `long_documents_split`
    counts such documents (local sources; a catalog's are split as the pipeline reads them).

    Raises ValueError for an unknown name, SourceError (a ValueError) for unusable files or
    settings, NotPreparedError (a ValueError) for a TFDS dataset not prepared in data_dir.
    """
    spec, data_dir = _spec(data_cfg, name), _data_dir(data_cfg)
    if spec is None:
        return stdlib.prepare(data_dir)
    if spec.kind == "tfds":
        return catalog.prepare(name, spec, data_dir)
    return local.prepare(name, spec, data_dir, max_document_bytes(data_cfg))


def load(data_cfg: ml_collections.ConfigDict, name: str, split: str) -> Any:
    """A random-access source (len, __getitem__ -> dict with "text": UTF-8 bytes) of split
    "train" or "validation". FileNotFoundError when `prepare` has not built it (for local
    sources: not for the files' current contents)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")
    spec, data_dir = _spec(data_cfg, name), _data_dir(data_cfg)
    if spec is None:
        return stdlib.load(data_dir, split)
    if spec.kind == "tfds":
        return catalog.load(name, spec, data_dir, split)
    return local.load(name, spec, data_dir, split, max_document_bytes(data_cfg))


def prepare_all(data_cfg: ml_collections.ConfigDict) -> dict[str, dict[str, int]]:
    """Builds every source of the mixture once and returns each one's build statistics.
    With several processes process 0 builds while the others wait, then they read the
    statistics of what it built."""
    import jax
    from jax.experimental import multihost_utils

    names = [name for name, _ in config_lib.parse_mixture(data_cfg.dataset)]
    if jax.process_index() == 0:
        stats = {name: prepare(data_cfg, name) for name in names}
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm: sources prepared")
        if jax.process_index() != 0:
            stats = {name: prepare(data_cfg, name) for name in names}  # already built
    return stats


def documents(data_cfg: ml_collections.ConfigDict, split: str, limit: int) -> Iterator[str]:
    """The first `limit` documents of `split` of every source of the mixture, in stored
    order, as text (invalid UTF-8 replaced); the sources are built first if needed."""
    names = [name for name, _ in config_lib.parse_mixture(data_cfg.dataset)]
    for name in names:
        prepare(data_cfg, name)
    count = 0
    for name in names:
        source = load(data_cfg, name, split)
        for i in range(len(source)):
            if count == limit:
                return
            text = source[i]["text"]
            yield text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            count += 1
