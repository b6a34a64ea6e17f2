"""Each process of a 2 x 4 rehearsal feeds its rows, and the global batch is the
single-process batch, for several meshes (run by global_batch_worker.py)."""

import io
import json
import pathlib
import sys

import numpy as np

from jaxlm import config
from jaxlm.data import pipeline
from jaxlm.launch import local as launch_local

WORKER = pathlib.Path(__file__).with_name("global_batch_worker.py")
sys.path.insert(0, str(WORKER.parent))
import global_batch_worker as worker  # noqa: E402


def test_global_batch_equals_the_single_process_batch(stdlib_data_dir, tmp_path):
    out = io.StringIO()
    code = launch_local.launch([sys.executable, str(WORKER), stdlib_data_dir, str(tmp_path)],
                               processes=2, devices_per_process=4, out=out)
    assert code == 0, out.getvalue()[-3000:]
    batches = np.load(tmp_path / "batches.npz")
    recorded = json.loads((tmp_path / "rows.json").read_text())

    data_cfg = config.defaults().data
    data_cfg.update(data_dir=stdlib_data_dir, seq_len=worker.SEQ_LEN,
                    global_batch_size=worker.GLOBAL_BATCH)
    single = pipeline.make_iterator(data_cfg)
    expected = [next(single) for _ in range(worker.STEPS)]
    expected_state = single.get_state()
    single.close()

    halves = [list(range(4)), list(range(4, 8))]
    everything = list(range(8))
    assert recorded["rows"] == {"data2_fsdp2_tensor2": halves, "fsdp8": halves,
                                "fsdp4_tensor2": halves, "tensor8": [everything, everything],
                                "two_slices": halves}
    for name in worker.MESHES:
        for step, batch in enumerate(expected):
            for key, value in batch.items():
                np.testing.assert_array_equal(batches[f"{name}/{step}/{key}"], value,
                                              err_msg=f"{name} step {step} {key}")
        # Both processes' positions merged: the single-process iterator's state.
        assert recorded["states"][name] == json.loads(json.dumps(expected_state)), name
