"""The streaming safetensors reader/writer against the reference `safetensors` library."""

import json

import ml_dtypes
import numpy as np
import pytest

from jaxlm.convert import safetensors_io as st

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def arrays():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "b.bias": rng.standard_normal((3,)).astype(np.float16),
        "c": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "d.ids": rng.integers(-5, 5, (6,)).astype(np.int64),
        "e.scalar": np.asarray(1.5, np.float64),
    }


def test_reads_files_written_by_safetensors(tmp_path):
    expected = arrays()
    safetensors_numpy.save_file(expected, str(tmp_path / "x.safetensors"))
    header = st.read_header(tmp_path / "x.safetensors")
    assert set(header) == set(expected)
    for name, value in expected.items():
        got = st.read_tensor(header[name])
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), value.reshape(-1).view(np.uint8))
    out = np.empty((7, 5), np.float32)  # straight into a caller's buffer
    assert st.read_tensor(header["a.weight"], out=out) is out
    np.testing.assert_array_equal(out, expected["a.weight"])


def test_written_files_load_in_safetensors_with_pt_metadata(tmp_path):
    expected = arrays()
    produced = []

    def plan(name, value):
        def produce():
            produced.append(name)  # produced lazily, in order, one at a time
            return value
        return st.TensorPlan(name, value.shape, value.dtype, produce)

    plans = [plan(n, v) for n, v in expected.items()]
    st.write_file(tmp_path / "y.safetensors", plans)
    assert produced == list(expected)
    loaded = safetensors_numpy.load_file(str(tmp_path / "y.safetensors"))
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name].reshape(-1).view(np.uint8),
                                      value.reshape(-1).view(np.uint8))
    raw = (tmp_path / "y.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}


def test_sharded_checkpoint_round_trip(tmp_path):
    expected = {f"t{i}": np.full((100,), i, np.float32) for i in range(5)}  # 400 bytes each
    plans = [st.TensorPlan(n, v.shape, v.dtype, lambda v=v: v) for n, v in expected.items()]
    assert [len(s) for s in st.plan_shards(plans, 1000)] == [2, 2, 1]
    assert [len(s) for s in st.plan_shards(plans, 100)] == [1, 1, 1, 1, 1]  # too big: alone
    files = st.write_checkpoint(tmp_path, plans, max_shard_bytes=1000)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / st.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 2000 and index["weight_map"]["t4"] == files[2].name
    tensors = st.read_headers(st.checkpoint_files(tmp_path))
    for name, value in expected.items():
        np.testing.assert_array_equal(st.read_tensor(tensors[name]), value)
    (tmp_path / "one").mkdir()
    assert st.write_checkpoint(tmp_path / "one", plans, 10**6) == [tmp_path / "one" / st.SINGLE_FILE]


def test_malformed_files_name_themselves(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(st.SafetensorsError, match="short.safetensors"):
        st.read_header(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json" + b" " * 20)
    with pytest.raises(st.SafetensorsError, match="junk.safetensors.*header"):
        st.read_header(tmp_path / "junk.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "size.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 12)
    with pytest.raises(st.SafetensorsError, match="'w' has 12 bytes"):
        st.read_header(tmp_path / "size.safetensors")
