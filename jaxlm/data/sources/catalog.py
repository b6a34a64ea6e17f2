"""kind=tfds: a TFDS dataset already prepared (in ArrayRecord) under data_dir.

The dataset is opened from its files (dataset_info.json, features.json), never from its
builder code: nothing is downloaded, and catalog modules (some of which need TensorFlow or
extra packages) are never imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from jaxlm.data.sources._common import NotPreparedError, SourceError, stats


class TextField:
    """A random-access source of {"text": bytes} records: one feature of a TFDS source."""

    def __init__(self, source: Any, field: str):
        self._source = source
        self._field = field

    def __len__(self) -> int:
        return len(self._source)

    def _record(self, record: dict[str, Any]) -> dict[str, bytes]:
        text = record[self._field]
        return {"text": text if isinstance(text, bytes) else str(text).encode("utf-8")}

    def __getitem__(self, index: int) -> dict[str, bytes]:
        return self._record(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, bytes]]:
        return [self._record(r) for r in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"TextField({self._source!r}, field={self._field!r})"


def _builder(name: str, spec: Any, data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared dataset, checked for format, splits and text feature."""
    key = f"data.sources.{name}"
    tfds_name = spec.tfds_name
    try:
        builder = tfds.core.read_only_builder.builder_from_files(tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        base = tfds_name.partition(":")[0]
        raise NotPreparedError(
            f"{key}.tfds_name: TFDS dataset {tfds_name!r} is not prepared under data_dir "
            f"{data_dir} (jaxlm never downloads). Prepare it there in array_record format, "
            f"e.g. `tfds build {base} --data_dir={data_dir} --file_format=array_record` or "
            f"tfds.builder({base!r}, data_dir={data_dir!r}, file_format='array_record')"
            f".download_and_prepare()") from None
    except ValueError as e:  # a malformed name, or the dataset found in several places
        raise SourceError(f"{key}.tfds_name: {tfds_name!r}: {e}") from e
    info = builder.info
    if file_adapters.FileFormat.ARRAY_RECORD not in info.available_file_formats():
        formats = sorted(str(f.value) for f in info.available_file_formats())
        raise SourceError(
            f"{key}.tfds_name: {tfds_name!r} under {data_dir} is stored as {formats}, but "
            f"jaxlm reads TFDS datasets (without TensorFlow) only from array_record. "
            f"Prepare it again with file_format='array_record', or convert it with "
            f"`tfds convert_format --dataset_dir={builder.data_dir} "
            f"--out_file_format=array_record` (needs TensorFlow)")
    available = sorted(info.splits.keys())
    for split_key in ("train_split", "eval_split"):
        split = spec[split_key]
        try:
            info.splits[split]  # also accepts slices such as "train[:99%]"
        except (KeyError, ValueError) as e:
            raise SourceError(f"{key}.{split_key}: {tfds_name!r} has no split {split!r}; "
                              f"splits: {available} ({e})") from None
    features = list(info.features.keys())
    if spec.text_field not in features:
        raise SourceError(f"{key}.text_field: {tfds_name!r} has no feature "
                          f"{spec.text_field!r}; features: {features}")
    feature = info.features[spec.text_field]
    if not (isinstance(feature, tfds.features.Text)
            or getattr(feature, "np_dtype", None) in (object, bytes, str)):
        raise SourceError(f"{key}.text_field: feature {spec.text_field!r} of {tfds_name!r} "
                          f"is {type(feature).__name__}, not text")
    return builder


def prepare(name: str, spec: Any, data_dir: str) -> dict[str, int]:
    """Nothing to build: checks the prepared dataset and reports its document counts."""
    builder = _builder(name, spec, data_dir)
    return stats(builder.info, spec.train_split, spec.eval_split)


def load(name: str, spec: Any, data_dir: str, split: str) -> TextField:
    builder = _builder(name, spec, data_dir)
    tfds_split = spec.train_split if split == "train" else spec.eval_split
    source = builder.as_data_source(split=tfds_split, file_format="array_record")
    return TextField(source, spec.text_field)
