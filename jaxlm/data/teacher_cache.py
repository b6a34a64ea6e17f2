"""A teacher's cached predictions for offline distillation: written once by
`jaxlm distill cache`, read back beside the training batches they were made from.

    DIR/meta.json              what the cache holds (JSON; written last: a cache without it
                               is incomplete and refused)
    DIR/rows-pNNNNN.array_record   one file per writing process, its rows of every global
                               batch: record (step s, the file's i-th row) at s x rows + i

A record is one row of one step: the teacher's `top_k` largest logits of every position
(float32, L x k, largest first), their token ids (int32, L x k) and the row's input tokens
(int32, L), as raw little-endian bytes whose shapes meta.json states. Nothing is pickled.

`WithTeacher` wraps a run's training batches: batch k (the pipeline's order is a pure
function of the seed and k) gets the cache's step k, checked token for token against the
batch's inputs, as `teacher_logits` and `teacher_ids` (rows x L x k). Its position is the
pipeline's plus the step, so a resumed run reads the cache from where it stopped.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jaxlm.errors import ConfigError, UserError

FORMAT, VERSION = "jaxlm teacher cache", 1
META = "meta.json"
_OPTIONS = "group_size:1,uncompressed"  # one record per read: rows are read at random


class TeacherCacheError(UserError):
    """A cache that is incomplete, of another format, or not made for this run's batches."""


def file_name(process_index: int) -> str:
    return f"rows-p{process_index:05d}.array_record"


def _record(logits_LxK: np.ndarray, ids_LxK: np.ndarray, inputs_L: np.ndarray) -> bytes:
    return (np.ascontiguousarray(logits_LxK, "<f4").tobytes()
            + np.ascontiguousarray(ids_LxK, "<i4").tobytes()
            + np.ascontiguousarray(inputs_L, "<i4").tobytes())


class RowsWriter:
    """One process's file: its `rows` of each step, appended step after step."""

    def __init__(self, directory: pathlib.Path, rows: Sequence[int], process_index: int):
        self.name, self.rows = file_name(process_index), [int(r) for r in rows]
        self._writer = ArrayRecordWriter(str(directory / self.name), _OPTIONS)
        self.steps = 0

    def write(self, logits_RxLxK: np.ndarray, ids_RxLxK: np.ndarray, inputs_RxL: np.ndarray
              ) -> None:
        """One step: row i of each array is global row `rows[i]`."""
        for i in range(len(self.rows)):
            self._writer.write(_record(logits_RxLxK[i], ids_RxLxK[i], inputs_RxL[i]))
        self.steps += 1

    def close(self) -> dict[str, Any]:
        """The file's entry in meta.json."""
        self._writer.close()
        return {"name": self.name, "rows": self.rows, "steps": self.steps}


def write_meta(directory: pathlib.Path, meta: dict[str, Any]) -> None:
    """meta.json, atomically: the cache is complete once it exists."""
    tmp = directory / f".{META}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=1))
    os.replace(tmp, directory / META)


class TeacherCache:
    """A complete cache (meta.json read, checked); `read_step` reads any rows of a step."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory).expanduser().absolute()
        where = f"config.distill.cache: {self.directory}"
        if not self.directory.is_dir():
            raise TeacherCacheError(f"{where} is not a directory")
        try:
            meta = json.loads((self.directory / META).read_text())
        except FileNotFoundError:
            raise TeacherCacheError(f"{where} has no {META}: not a teacher cache, or its "
                                    f"`jaxlm distill cache` did not finish") from None
        except ValueError as e:
            raise TeacherCacheError(f"{where}/{META} is not JSON ({e})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise TeacherCacheError(f"{where}: {META} is not a version {VERSION} teacher cache "
                                    f"(format {meta.get('format')!r}, version "
                                    f"{meta.get('version')!r})")
        self.meta = meta
        self.steps, self.top_k = int(meta["steps"]), int(meta["top_k"])
        self.seq_len = int(meta["seq_len"])
        self._where: dict[int, tuple[int, int, int]] = {}  # row -> (file, index, rows in file)
        self._paths = []
        for f, entry in enumerate(meta["files"]):
            self._paths.append(str(self.directory / entry["name"]))
            for i, row in enumerate(entry["rows"]):
                self._where[int(row)] = (f, i, len(entry["rows"]))
        self._sources: list[Any] = [None] * len(self._paths)

    def check_batches(self, order: dict[str, Any]) -> None:
        """ConfigError unless the cache was made for the batches of these settings (the
        pipeline's order_meta)."""
        mine = self.meta["data"]
        changed = {k: (mine.get(k), order.get(k)) for k in {**mine, **order}
                   if mine.get(k) != order.get(k)}
        if changed:
            raise ConfigError(f"config.distill.cache: {self.directory} was made for other "
                              f"batches (cached, this run's): {changed}")

    def check_rows(self, rows: Sequence[int]) -> None:
        missing = [r for r in rows if r not in self._where]
        if missing:
            raise TeacherCacheError(f"config.distill.cache: {self.directory} holds no row "
                                    f"{missing[0]} of the global batch (it holds "
                                    f"{len(self._where)} rows)")

    def _source(self, f: int):
        if self._sources[f] is None:
            self._sources[f] = grain.sources.ArrayRecordDataSource([self._paths[f]])
        return self._sources[f]

    def read_step(self, step: int, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """teacher_logits, teacher_ids (rows x L x k) and inputs (rows x L) of `step`."""
        length, k = self.seq_len, self.top_k
        cut = [0, length * k * 4, 2 * length * k * 4]
        out: dict[str, list] = {"teacher_logits": [], "teacher_ids": [], "inputs": []}
        for row in rows:
            f, i, n = self._where[row]
            data = self._source(f)[step * n + i]
            out["teacher_logits"].append(np.frombuffer(data[:cut[1]], "<f4").reshape(length, k))
            out["teacher_ids"].append(np.frombuffer(data[cut[1]:cut[2]], "<i4").reshape(length, k))
            out["inputs"].append(np.frombuffer(data[cut[2]:], "<i4"))
        return {key: np.stack(v).astype(np.float32 if key == "teacher_logits" else np.int32)
                for key, v in out.items()}


class WithTeacher:
    """The `Batches` of a run distilled from a cache: the pipeline's batches (`batches`, a
    jaxlm.data.pipeline.BatchIterator of `rows`) with the cache's predictions of each step
    added; the cache's next steps are read ahead in a thread."""

    def __init__(self, batches, cache: TeacherCache, rows: Sequence[int]):
        """`cache` checked against the run's settings (`check_batches`) by the caller, before
        the run writes anything; each batch's tokens are checked here."""
        cache.check_rows(rows)
        self._batches, self._cache, self._rows = batches, cache, list(rows)
        self._step, self._reader = 0, self._read_from(0)

    def _read_from(self, step: int):
        steps = grain.MapDataset.range(step, max(step, self._cache.steps))
        ds = steps.map(lambda s: self._cache.read_step(s, self._rows))
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
                                  ).__iter__()

    def __iter__(self) -> WithTeacher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._batches)
        if self._step >= self._cache.steps:
            raise TeacherCacheError(f"config.distill.cache: {self._cache.directory} holds "
                                    f"{self._cache.steps} steps; step {self._step + 1} has no "
                                    f"teacher predictions")
        taught = next(self._reader)
        if not np.array_equal(taught.pop("inputs"), batch["inputs"]):
            raise TeacherCacheError(f"config.distill.cache: the tokens of step {self._step + 1} "
                                    f"in {self._cache.directory} differ from this run's batch: "
                                    f"the cache was made for other data")
        self._step += 1
        return {**batch, **taught}

    def get_state(self) -> dict[str, Any]:
        return {**self._batches.get_state(), "teacher_cache_step": self._step}

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        steps = {s["teacher_cache_step"] for s in states}
        if len(steps) != 1:
            raise ValueError(f"the processes' teacher cache positions disagree: {sorted(steps)}")
        return {**self._batches.merge_states(states), "teacher_cache_step": steps.pop()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "teacher_cache_step" not in state:
            raise TeacherCacheError("config.distill.cache: the run's data position was saved "
                                    "without a teacher cache")
        self._batches.set_state(state)
        self._step = int(state["teacher_cache_step"])
        self._reader.close()
        self._reader = self._read_from(self._step)

    def progress(self, step: int) -> dict[str, float]:
        return self._batches.progress(step)

    def close(self) -> None:
        self._reader.close()
        self._batches.close()
