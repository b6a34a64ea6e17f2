"""One process of a `launch_local` rehearsal that records the global batch jaxlm builds.

    python tests/multihost/global_batch_worker.py DATA_DIR OUT_DIR

For each mesh in MESHES it reads this process's rows of the batch (distributed.local_rows),
places them with jaxlm.parallel.mesh.to_global_batch, gathers the whole global array back to every
process and (process 0) writes it to OUT_DIR/batches.npz, with each process's rows and
the merged data-iterator state in OUT_DIR/rows.json. The test compares them with a
single-process iterator.
"""

import json
import pathlib
import sys

from jaxlm.parallel import distributed

MESHES = {  # name -> mesh config values
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
    "tensor8": dict(data=1, fsdp=1, tensor=8),  # the batch is replicated on every process
    "two_slices": dict(data=1, fsdp=-1, tensor=1, dcn_data=2),  # hybrid mesh, slice = process
}
STEPS = 2
GLOBAL_BATCH, SEQ_LEN = 8, 32


def main(data_dir: str, out_dir: str) -> None:
    plan = distributed.initialize()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxlm import config
    from jaxlm.data import pipeline
    from jaxlm.parallel import mesh as mesh_lib
    from jaxlm.parallel import rules

    assert plan.kind == "local" and jax.process_count() == 2, plan
    data_cfg = config.defaults().data
    data_cfg.update(data_dir=data_dir, seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH)
    arrays, rows_by_mesh, states = {}, {}, {}
    for name, axes in MESHES.items():
        mesh_cfg = config.defaults().mesh
        mesh_cfg.update(axes)
        mesh = mesh_lib.make_mesh(mesh_cfg)
        rows = distributed.local_rows(rules.batch_sharding(mesh), GLOBAL_BATCH)
        it = pipeline.make_iterator(data_cfg, rows=rows)
        for step in range(STEPS):
            global_batch = mesh_lib.to_global_batch(next(it), mesh)
            for key, value in global_batch.items():
                arrays[f"{name}/{step}/{key}"] = multihost_utils.process_allgather(value, tiled=True)
        rows_by_mesh[name] = distributed.allgather_json(rows)
        states[name] = pipeline.merge_states(distributed.allgather_json(it.get_state()))
        it.close()
    if jax.process_index() == 0:
        out = pathlib.Path(out_dir)
        np.savez(out / "batches.npz", **arrays)
        (out / "rows.json").write_text(json.dumps({"rows": rows_by_mesh, "states": states}))


if __name__ == "__main__":
    main(*sys.argv[1:])
