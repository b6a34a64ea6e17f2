"""The built-in corpus: this Python's standard-library sources, one document per file."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from jaxlm.data.sources import _common

# Directory names never descended into: installed packages and the stdlib's own test suites.
_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests"})
_VALIDATION_PERCENT = 1


def _is_validation(relpath: str) -> bool:
    """Deterministic ~1% split: depends only on the path, never on walk order or machine."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < _VALIDATION_PERCENT


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """(relative posix path, absolute path) of every stdlib *.py file, sorted by path."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    # os.walk does not follow directory symlinks, so no file is visited twice.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for filename in filenames:
            if filename.endswith(".py"):
                path = os.path.join(dirpath, filename)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(found)


class Stdlib(tfds.core.GeneratorBasedBuilder):
    """Every *.py file of this Python's standard library, one document per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No checksums file to find. Also sidesteps tfds 4.9.10's `code_path`, which imports the
    # `importlib_resources` backport (not installed on Python >= 3.9) for package modules.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` would look for README/CITATIONS
        # files next to this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Python standard library sources (*.py, no tests, no site-packages).",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Everything is local.
        files = stdlib_files()
        return {
            "train": self._generate_examples([f for f in files if not _is_validation(f[0])]),
            "validation": self._generate_examples([f for f in files if _is_validation(f[0])]),
        }

    def _generate_examples(self, files: Sequence[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for relpath, path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue  # Unreadable or not UTF-8: skipped rather than failing the build.
            yield relpath, {"text": text, "path": relpath}


def _builder(data_dir: str) -> Stdlib:
    return Stdlib(data_dir=data_dir, file_format="array_record")


def prepare(data_dir: str) -> dict[str, int]:
    builder = _builder(data_dir)
    if not builder.is_prepared():
        # TFDS writes into an `incomplete.*` directory and renames it at the end, so an
        # interrupted build is never mistaken for a finished one.
        _common.build(builder)
    # Empty files are kept as (empty) documents and undecodable ones dropped, as always:
    # nothing is skipped or replaced in the sense of the local sources' statistics.
    return _common.stats(builder.info, "train", "validation")


def load(data_dir: str, split: str) -> Any:
    """Records {"text": bytes, "path": bytes}."""
    builder = _builder(data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"source 'stdlib' is not built under {data_dir}; run "
            f"jaxlm.data.sources.prepare(data_cfg, 'stdlib') first")
    return builder.as_data_source(split=split)
