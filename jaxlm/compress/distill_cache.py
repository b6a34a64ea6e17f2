"""`jaxlm distill cache`: a teacher's predictions on a run's training batches, computed once
and written for offline distillation.

    jaxlm distill cache --config configs/distill_tiny.py --out runs/teacher-top64 [--top-k 64]
    jaxlm train --config configs/distill_tiny.py --config.distill.cache=runs/teacher-top64

The config is the student's (its distill.teacher the run that teaches, its data the batches
to cache): the teacher runs over the first `--steps` (default train.steps) global batches
the student's `jaxlm train` will read, in the same order (the pipeline's order is a pure
function of the seed and the step), sharded on the config's mesh, and keeps each position's
`--top-k` largest logits and their ids (jaxlm.data.teacher_cache has the format). Training
with `distill.cache` then reads them beside each batch (checked token for token) instead
of running the teacher: the step costs the student alone, the teacher's weights need not fit
beside it, and many students can share one cache. The KL term uses the teacher's
distribution renormalised over its top k (with k = the vocabulary, exactly the online loss).
Each process writes its own rows; meta.json, written last, completes the cache.
"""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from jaxlm.checkpoint import rundir
from jaxlm.data import teacher_cache
from jaxlm.errors import ConfigError
from jaxlm.parallel import distributed, rules
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.train import distill


def _local(a: jax.Array, rows: list[int]) -> np.ndarray:
    """This process's `rows` (ascending global rows) of a batch-sharded global array."""
    got: dict[int, np.ndarray] = {}
    for shard in a.addressable_shards:
        first = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            got.setdefault(first + i, data[i])
    return np.stack([got[r] for r in rows])


def cache_run(cfg: ml_collections.ConfigDict, out: str | os.PathLike, top_k: int = 64,
              steps: int | None = None, log=print) -> pathlib.Path:
    """Writes the cache `out` (module docstring) of cfg.distill.teacher's predictions on
    the batches of `cfg`; returns its directory."""
    out = rundir.new_output(out)
    if not cfg.distill.teacher:
        raise ConfigError("config.distill.teacher: name the run whose predictions to cache")
    if cfg.distill.cache:
        raise ConfigError(f"config.distill.cache={cfg.distill.cache!r} is what `jaxlm train` "
                          f"reads; `jaxlm distill cache` writes --out")
    steps = cfg.train.steps if steps is None else steps
    if steps < 1:
        raise ConfigError(f"--steps {steps}: cache at least one step")
    task = distill.Distill(mesh_lib.fit_mesh(cfg))  # checks the student's config and teacher
    teacher = task.teacher
    vocab = teacher.model.vocab_size
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k {top_k}: between 1 and the vocabulary ({vocab:,})")
    mesh = mesh_lib.make_mesh(task.cfg.mesh)
    global_batch = task.cfg.data.global_batch_size
    rows = distributed.local_rows(rules.batch_sharding(mesh), global_batch)
    inputs = ("inputs", "positions", "segment_ids")
    batch_shardings = {k: s for k, s in task.batch_shardings(mesh).items() if k in inputs}
    taught = NamedSharding(mesh, rules.logical_to_spec(("batch", "sequence", None)))
    with mesh_lib.use(mesh):
        teacher.place(mesh)
        params = teacher.load()
        graphdef, block = teacher.graphdef, task.cfg.optim.loss_block
        predict = jax.jit(lambda p, b: distill.teacher_topk(graphdef, p, b, top_k, block),
                          out_shardings=(taught, taught))  # inputs: placed as they come
        batches = task.train_batches(rows, lambda line: None)
        if jax.process_index() == 0:
            out.mkdir(parents=True, exist_ok=True)
        distributed.allgather_json(0)  # the directory exists for every process
        writer = teacher_cache.RowsWriter(out, rows, jax.process_index())
        try:
            for step in range(steps):
                host = next(batches)
                values, ids = predict(params, mesh_lib.to_global(
                    {k: host[k] for k in inputs}, batch_shardings))
                writer.write(_local(values, rows), _local(ids, rows), host["inputs"])
                if (step + 1) % 100 == 0 and step + 1 < steps:
                    log(f"cached {step + 1}/{steps} steps")
        finally:
            entry = writer.close()
            batches.close()
    files = distributed.allgather_json(entry)
    if jax.process_index() == 0:
        teacher_cache.write_meta(out, {
            "steps": steps, "top_k": top_k, "global_batch": global_batch,
            "seq_len": int(task.cfg.data.seq_len), "vocab_size": vocab,
            "tokenizer": task.tokenizer.name, **teacher.record(), "data": batches.meta,
            "files": files})
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote a teacher cache {out}: {teacher.step_dir}'s top-{top_k} logits at "
        f"{global_batch} x {task.cfg.data.seq_len} positions of {steps} steps "
        f"({size / 2**20:,.1f} MiB); train with --config.distill.cache={out}")
    return out
