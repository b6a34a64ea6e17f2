"""`jaxlm bench data`: the loader alone, batches/s and tokens/s of the training pipeline; with
`--huge-document-mb N`, its peak resident memory on a source that is one N-MB document.

The huge-document figures: a temporary directory gets a local source of one synthetic
document of N MB (10^6 bytes; a text file, or with `--huge-document-kind jsonl` one JSONL
line) and one short document (the held-out split needs a document of its own; it is named so
that the long one trains). Then fresh Python processes run one after the other, each
reporting its own peak resident set size (VmHWM in /proc/self/status; getrusage's ru_maxrss
would carry the parent's RSS at fork):
    baseline  imports the data pipeline (Grain, TFDS, jaxlm.data)
    build     the same, then builds the source (`sources.prepare`)
    load      the same, then `make_iterator` and --batches batches of the configured shape
The loader's peak is the larger of build and load; target: below 2 GB for a 1 GB document.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

from jaxlm.bench.conditions import HostConditions
from jaxlm.bench.table import print_table
from jaxlm.data import pipeline, sources
from jaxlm.data.sources import local
from jaxlm.train.validate import validate

_TARGET_BYTES = 2e9

_CHILD = r"""
import json, sys, time
import ml_collections
from jaxlm.data import pipeline, sources
action, cfg_path, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
data_cfg = ml_collections.ConfigDict(json.load(open(cfg_path)))
out, start = {}, time.perf_counter()
if action == "build":
    out["stats"] = sources.prepare(data_cfg, data_cfg.dataset)
elif action == "load":
    it, real = pipeline.make_iterator(data_cfg), 0
    for _ in range(batches):
        real += int((next(it)["segment_ids"] > 0).sum())
    it.close()
    out["real_tokens"] = real
out["seconds"] = time.perf_counter() - start
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
out["peak_bytes"] = int(status[0]) * 1024
print(json.dumps(out))
"""


def bench_data(cfg: ml_collections.ConfigDict, batches: int = 2000) -> dict[str, float]:
    """The loader alone: batches/s and tokens/s of `make_iterator` on this host, after the
    corpus is built and one batch has warmed it up."""
    host = HostConditions()
    validate(cfg, jax.device_count())
    sources.prepare_all(cfg.data)
    data_iter = pipeline.make_iterator(cfg.data)
    next(data_iter)
    real = slots = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(data_iter)
        real += int(np.count_nonzero(batch["segment_ids"]))
        slots += batch["segment_ids"].size
    seconds = time.perf_counter() - start
    data_iter.close()
    figures = {"tokens_per_sec": slots / seconds, "real_tokens_per_sec": real / seconds,
               "packing_efficiency": real / slots, "batches_per_sec": batches / seconds,
               **host.figures()}
    shape = (f"dataset={cfg.data.dataset} tokenizer={cfg.data.tokenizer} "
             f"packing={cfg.data.packing} seq={cfg.data.seq_len} batch={cfg.data.global_batch_size}")
    print_table([
        ("config", shape),
        (f"batches/s ({batches} batches)", f"{batches / seconds:,.1f}"),
        ("tokens/s (all slots)", f"{slots / seconds:,.0f}"),
        ("real tokens/s", f"{real / seconds:,.0f}"),
        ("packing efficiency", f"{100 * real / slots:.2f}%"),
        *host.rows(),
    ])
    return figures


def write_huge_source(directory: pathlib.Path, size_mb: float, kind: str) -> dict[str, str]:
    """One document of about `size_mb` MB (lines of seeded pseudo-random words, some of them
    not ASCII) and a short one, as files of `kind` (text: one file each; jsonl: one line
    each, the text escaped as JSON writes it). Returns the source's settings."""
    rng = np.random.default_rng(0)
    words = ["the", "data", "loader", "reads", "one", "piece", "at", "a", "time", "über",
             "naïve", "€100", "日本語", "tab\there", 'say "hi"', "back\\slash"]
    lines = [" ".join(rng.choice(words, size=rng.integers(4, 16))) for _ in range(20_000)]
    block = ("\n".join(lines) + "\n").encode("utf-8")  # ~1 MB, repeated
    target = int(size_mb * 1e6)
    suffix = ".txt" if kind == "text" else ".jsonl"
    # The short document's name: the held-out split takes the document of lowest hash.
    huge = f"huge{suffix}"
    short = next(f"short-{i}{suffix}" for i in range(1000)
                 if local.document_hash(f"short-{i}{suffix}", 0) < local.document_hash(huge, 0))
    with open(directory / huge, "wb") as f:
        if kind == "jsonl":
            f.write(b'{"id": 0, "text": "')
            block = json.dumps(block.decode("utf-8"), ensure_ascii=False)[1:-1].encode("utf-8")
        written = 0
        while written < target:
            part = block[:target - written]
            f.write(part)
            written += len(part)
        if kind == "jsonl":
            f.write(b'"}\n')
    text = "A short document, held out for validation.\n"
    (directory / short).write_text(text if kind == "text" else json.dumps({"text": text}) + "\n")
    return {"kind": kind, "paths": f"{directory}/*{suffix}"}


def _run_child(action: str, cfg_path: pathlib.Path, batches: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, "-c", _CHILD, action, str(cfg_path), str(batches)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {action} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_huge_document(cfg: ml_collections.ConfigDict, size_mb: float, kind: str = "text",
                        batches: int = 2000, directory: str | None = None) -> dict:
    """Prints and returns the figures of the module docstring."""
    host = HostConditions()
    validate(cfg, jax.device_count())
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        scratch = pathlib.Path(scratch)
        (scratch / "files").mkdir()
        start = time.perf_counter()
        spec = write_huge_source(scratch / "files", size_mb, kind)
        file_bytes = (scratch / "files" / f"huge.{'txt' if kind == 'text' else 'jsonl'}").stat().st_size
        print(f"huge document: {file_bytes / 1e6:,.1f} MB {kind} file written in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
        data_cfg.update(dataset="huge", data_dir=str(scratch / "tfds"))
        data_cfg.sources = ml_collections.ConfigDict({"huge": spec})
        cfg_path = scratch / "data_cfg.json"
        cfg_path.write_text(data_cfg.to_json())
        base = _run_child("baseline", cfg_path, 0)
        build = _run_child("build", cfg_path, 0)
        load = _run_child("load", cfg_path, batches)
    stats = build["stats"]
    peak = max(build["peak_bytes"], load["peak_bytes"])
    shape = (f"tokenizer={data_cfg.tokenizer} packing={data_cfg.packing} seq={data_cfg.seq_len} "
             f"batch={data_cfg.global_batch_size} "
             f"max_document_bytes={data_cfg.max_document_bytes:,}")
    records = (f"{stats['train_documents']:,} train / {stats['validation_documents']:,} "
               f"validation records; {stats['long_documents_split']} document split")
    built = (f"{build['peak_bytes'] / 1e6:,.1f} MB ({build['seconds']:.1f} s, "
             f"{file_bytes / 1e6 / build['seconds']:,.1f} MB/s)")
    loaded = (f"{load['peak_bytes'] / 1e6:,.1f} MB ({load['seconds']:.1f} s, "
              f"{load['real_tokens'] / load['seconds']:,.0f} real tokens/s)")
    verdict = "meets" if peak < _TARGET_BYTES else "MISSES"
    print_table([
        ("config", shape),
        ("source", records),
        ("baseline peak RSS (imports)", f"{base['peak_bytes'] / 1e6:,.1f} MB"),
        ("build peak RSS", built),
        (f"load peak RSS ({batches} batches)", loaded),
        ("loader peak RSS", f"{peak / 1e6:,.1f} MB: {verdict} the target (< 2 GB)"),
        *host.rows(),
    ])
    return {"file_bytes": file_bytes, "baseline_peak_bytes": base["peak_bytes"],
            "build": build, "load": load, "peak_bytes": peak, **host.figures()}
