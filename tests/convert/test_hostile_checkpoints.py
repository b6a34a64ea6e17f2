"""Checkpoints a hostile or broken source can hand `convert from-hf` (issue 12, item 13): NaN
or Inf weights, tensors whose byte ranges overlap, symbolic link loops. Each is refused with
one error naming the tensor or path, and nothing is written."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from jaxlm import cli
from jaxlm.convert import hf_import
from jaxlm.convert import safetensors_io as st


def expect_error(hf_dir, out, *fragments):
    with pytest.raises(hf_import.ConversionError) as e:
        hf_import.import_hf(hf_dir, out, log=lambda _: None)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    assert not out.exists()  # nothing written
    return message


# ---- NaN and Inf ----------------------------------------------------------------------------

@pytest.mark.parametrize("family,tensor,dtype,index,value,shown", [
    # read straight into its parameter (float32, not transposed)
    ("llama", "model.layers.1.input_layernorm.weight", np.float32, (5,), np.nan, "nan"),
    # transposed into place
    ("llama", "model.layers.0.mlp.down_proj.weight", np.float32, (3, 7), -np.inf, "-inf"),
    # bf16 and f16, widened
    ("llama", "model.embed_tokens.weight", ml_dtypes.bfloat16, (100, 2), np.inf, "inf"),
    ("llama", "model.layers.1.self_attn.q_proj.weight", np.float16, (0, 0), np.nan, "nan"),
    # float64 that is finite but beyond float32's range
    ("llama", "model.norm.weight", np.float64, (31,), 1e39, "1e+39, beyond float32's range"),
    # GPT-2's fused q|k|v, split into three parameters: the value lands in v
    ("gpt2", "transformer.h.1.attn.c_attn.weight", np.float32, (4, 70), np.nan, "nan"),
])
def test_non_finite_weights_name_the_tensor(tmp_path, hf_models_module, family, tensor, dtype,
                                            index, value, shown):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf", hf_models_module.tiny_cfg(family))

    def poison(name, array):
        array = array.astype(dtype)
        if name == tensor:
            array[index] = value
        return {name: array}
    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE, poison)
    expect_error(hf_dir, tmp_path / "out", f"tensor {tensor!r} in {st.SINGLE_FILE}",
                 f"({shown}) at index {index}", "NaN and Inf weights are refused")


def test_finite_check_reads_chunk_by_chunk(tmp_path, hf_models_module, monkeypatch):
    """A value past the first chunk of a parameter is found as well."""
    monkeypatch.setattr(hf_import, "_CHECK_CHUNK", 7)
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    tensor = "model.layers.0.self_attn.k_proj.weight"  # (16, 32), transposed

    def poison(name, array):
        if name == tensor:
            array[15, 31] = np.nan  # the last element
        return {name: array}
    hf_models_module.rewrite_tensors(hf_dir / st.SINGLE_FILE, poison)
    expect_error(hf_dir, tmp_path / "out", repr(tensor), "(nan) at index (15, 31)")


# ---- overlapping byte ranges ----------------------------------------------------------------

def edit_header(path, change):
    """Rewrites a safetensors file's header with `change(header)`, keeping its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def test_overlapping_tensors_are_refused(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"

    def alias(header):  # k reads v's bytes (same shape and dtype): every size check passes
        header[k]["data_offsets"] = list(header[v]["data_offsets"])
    edit_header(hf_dir / st.SINGLE_FILE, alias)
    expect_error(hf_dir, tmp_path / "out", st.SINGLE_FILE, "overlaps", repr(k), repr(v))


def test_partly_overlapping_and_out_of_file_ranges(tmp_path):
    def write(path, entries, data_bytes):
        header = json.dumps(entries).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * data_bytes)

    entries = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
               "c": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}  # empty: no bytes
    write(tmp_path / "x.safetensors", entries, 24)
    with pytest.raises(st.SafetensorsError,
                       match=r"x.safetensors: tensor 'b' overlaps tensor 'a' "
                             r"\(both claim bytes \d+ to \d+"):
        st.read_header(tmp_path / "x.safetensors")
    entries["b"]["data_offsets"] = [16, 32]  # disjoint now, but past the end of the file
    write(tmp_path / "x.safetensors", entries, 24)
    with pytest.raises(st.SafetensorsError, match="'b' lies outside the file"):
        st.read_header(tmp_path / "x.safetensors")
    write(tmp_path / "x.safetensors", entries, 32)
    assert sorted(st.read_header(tmp_path / "x.safetensors")) == ["a", "b", "c"]


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]},  # sizes multiply to 4
    {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]},
    {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]},
])
def test_malformed_entries_name_the_tensor(tmp_path, entry):
    header = json.dumps({"w": entry}).encode()
    (tmp_path / "x.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(st.SafetensorsError, match="tensor 'w' has a malformed header entry"):
        st.read_header(tmp_path / "x.safetensors")


def test_a_name_twice_in_the_header(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = f'{{"w": {entry}, "w": {entry}}}'.encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(st.SafetensorsError, match="'w' appears twice"):
        st.read_header(tmp_path / "x.safetensors")


# ---- symbolic link loops --------------------------------------------------------------------

def loop(path):
    """`path` as a symbolic link to itself."""
    os.symlink(path.name, path)
    return path


def test_the_hf_directory_itself_is_a_loop(tmp_path, capsys):
    hf_dir = loop(tmp_path / "hf")
    expect_error(hf_dir, tmp_path / "out", f"{hf_dir}: symbolic link loop")
    # ... or a directory on the way to it: a -> b -> a
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    expect_error(tmp_path / "a" / "model", tmp_path / "out", "symbolic link loop")
    assert cli.main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"jaxlm: {hf_dir}: symbolic link loop (the path, or a " \
                                      f"link on the way to it, leads back to itself)\n"


@pytest.mark.parametrize("name", ["config.json", st.SINGLE_FILE, "tokenizer.json"])
def test_a_loop_inside_the_hf_directory(tmp_path, hf_models_module, name):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    (hf_dir / name).unlink()
    loop(hf_dir / name)
    expect_error(hf_dir, tmp_path / "out", f"{hf_dir / name}: symbolic link loop")


def test_a_shard_that_loops(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf", max_shard_bytes=20_000)
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    loop(shard)
    expect_error(hf_dir, tmp_path / "out", f"{shard}: symbolic link loop")


def test_an_output_directory_that_loops(tmp_path, hf_models_module):
    hf_dir = hf_models_module.write_hf_dir(tmp_path / "hf")
    out = loop(tmp_path / "out")
    with pytest.raises(hf_import.ConversionError, match=f"{out}: symbolic link loop"):
        hf_import.import_hf(hf_dir, out, log=lambda _: None)
    with pytest.raises(hf_import.ConversionError, match="symbolic link loop"):
        hf_import.import_hf(hf_dir, out / "run", log=lambda _: None)
