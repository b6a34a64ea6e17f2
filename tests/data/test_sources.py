"""Data sources: local files (text, jsonl, parquet) and prepared TFDS catalog datasets."""

import hashlib
import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm import config
from jaxlm.data import sources
from jaxlm.data.sources import local


def data_cfg(tmp_path, **named_sources):
    cfg = config.defaults().data
    cfg.data_dir = str(tmp_path / "tfds")
    cfg.sources = ml_collections.ConfigDict(named_sources)
    return cfg


def src(**keys):
    return ml_collections.ConfigDict(keys)


def write(path, data):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def texts(cfg, name, split):
    source = sources.load(cfg, name, split)
    return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def both_splits(cfg, name):
    """(train texts, validation texts), checked disjoint and non-empty."""
    train, validation = texts(cfg, name, "train"), texts(cfg, name, "validation")
    assert train and validation
    assert not set(train) & set(validation)
    return train, validation


def build_dirs(cfg):
    root = pathlib.Path(cfg.data_dir) / "jaxlm_local"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---- local kinds --------------------------------------------------------------------------------

def test_text_one_document_per_file(tmp_path):
    corpus = tmp_path / "corpus"
    docs = {"a.txt": "alpha\n\nstill alpha\n", "sub/b.txt": "βeta ✓",
            "sub/deep/c.txt": "  gamma"}
    for rel, text in docs.items():
        write(corpus / rel, text)
    write(corpus / "empty.txt", "")
    write(corpus / "blank.txt", " \n\t\n")
    write(corpus / "notes.md", "not matched")
    cfg = data_cfg(tmp_path, mine=src(kind="text", paths=f"{corpus}/**/*.txt"))
    stats = sources.prepare(cfg, "mine")
    train, validation = both_splits(cfg, "mine")
    assert sorted(train + validation) == sorted(docs.values())
    assert stats == {"train_documents": len(train), "validation_documents": len(validation),
                     "empty_skipped": 2, "invalid_utf8_replaced": 0, "long_documents_split": 0}
    record = sources.load(cfg, "mine", "train")[0]
    assert record["path"].decode() in docs  # relative to the files' common directory
    json.dumps(stats)


def test_comma_separated_paths_and_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write(tmp_path / "home/x.txt", "from home")
    write(tmp_path / "other/y.txt", "from other")
    write(tmp_path / "other/z.txt", "third")
    paths = f"~/x.txt, {tmp_path}/other/*.txt ,{tmp_path}/other/y.txt"  # y twice: read once
    cfg = data_cfg(tmp_path, mine=src(kind="text", paths=paths))
    sources.prepare(cfg, "mine")
    train, validation = both_splits(cfg, "mine")
    assert sorted(train + validation) == ["from home", "from other", "third"]


def test_blank_line_blocks(tmp_path):
    write(tmp_path / "doc.txt",
          "\n\nfirst line\nsecond line\n\n\n\n  indented block\n \t \nlast\r\nblock\r\n\r\n")
    cfg = data_cfg(tmp_path, mine=src(kind="text", paths=str(tmp_path / "doc.txt"),
                                      split_by="blank_line", eval_fraction=0.5))
    stats = sources.prepare(cfg, "mine")
    train, validation = both_splits(cfg, "mine")
    assert sorted(train + validation) == sorted(
        ["first line\nsecond line", "  indented block", "last\r\nblock"])
    assert stats["empty_skipped"] == 0 and stats["invalid_utf8_replaced"] == 0


def test_invalid_utf8_replaced_and_counted(tmp_path):
    write(tmp_path / "c/good.txt", "fine")
    write(tmp_path / "c/bad1.txt", b"caf\xe9 \xff\xfe")
    write(tmp_path / "c/bad2.txt", b"x\x80y")
    write(tmp_path / "c/replacement_char.txt", "already \ufffd, valid")
    cfg = data_cfg(tmp_path, mine=src(kind="text", paths=f"{tmp_path}/c/*.txt"))
    stats = sources.prepare(cfg, "mine")
    assert stats["invalid_utf8_replaced"] == 2
    train, validation = both_splits(cfg, "mine")
    assert sorted(train + validation) == sorted(
        ["fine", "caf\ufffd \ufffd\ufffd", "x\ufffdy", "already \ufffd, valid"])


def test_jsonl_documents(tmp_path):
    lines = [json.dumps({"text": "one", "id": 1}),
             "",  # blank lines are not documents
             json.dumps({"text": "line\u2028separator kept", "id": 2}, ensure_ascii=False),
             json.dumps({"text": None}),
             json.dumps({"text": "   "}),
             json.dumps({"text": "lone \udc80 surrogate"}),
             '{"text": "bad byte \xff"}']
    data = "\n".join(lines[:-1]).encode("utf-8") + b"\n" + lines[-1].encode("latin-1") + b"\n"
    write(tmp_path / "a.jsonl", data)
    write(tmp_path / "b.jsonl", json.dumps({"text": "two"}) + "\r\n")
    cfg = data_cfg(tmp_path, mine=src(kind="jsonl", paths=f"{tmp_path}/*.jsonl"))
    stats = sources.prepare(cfg, "mine")
    train, validation = both_splits(cfg, "mine")
    assert sorted(train + validation) == sorted(
        ["one", "line\u2028separator kept", "lone \ufffd\ufffd\ufffd surrogate",
         "bad byte \ufffd", "two"])
    assert stats["empty_skipped"] == 2 and stats["invalid_utf8_replaced"] == 2
    assert stats["train_documents"] + stats["validation_documents"] == 5


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["p1", "p2", None, "p3"], "n": [1, 2, 3, 4]}),
                   tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"body": pa.array([b"p4 \xff", b"", b"p5"], pa.binary())}),
                   tmp_path / "b.parquet")
    cfg = data_cfg(tmp_path, mine=src(kind="parquet", paths=f"{tmp_path}/*.parquet",
                                      text_field="body"))
    stats = sources.prepare(cfg, "mine")
    train, validation = both_splits(cfg, "mine")
    assert sorted(train + validation) == ["p1", "p2", "p3", "p4 \ufffd", "p5"]
    assert stats["empty_skipped"] == 2 and stats["invalid_utf8_replaced"] == 1


def test_validation_split_follows_the_documented_hash(tmp_path):
    n, fraction = 300, 0.2
    write(tmp_path / "d/all.jsonl", "".join(json.dumps({"text": f"doc {i}"}) + "\n"
                                            for i in range(n)))
    cfg = data_cfg(tmp_path, mine=src(kind="jsonl", paths=str(tmp_path / "d/all.jsonl"),
                                      eval_fraction=fraction))
    stats = sources.prepare(cfg, "mine")

    def held_out(i):
        digest = hashlib.sha256(f"all.jsonl\0{i}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction

    train, validation = both_splits(cfg, "mine")
    assert sorted(validation) == sorted(f"doc {i}" for i in range(n) if held_out(i))
    assert sorted(train) == sorted(f"doc {i}" for i in range(n) if not held_out(i))
    assert 0.1 * n < len(validation) < 0.3 * n
    assert stats["validation_documents"] == len(validation)
    # The same files elsewhere split the same way (paths are relative).
    other = data_cfg(tmp_path / "copy", mine=src(kind="jsonl", eval_fraction=fraction,
                                                 paths=str(write(tmp_path / "copy/all.jsonl",
                                                                 (tmp_path / "d/all.jsonl")
                                                                 .read_bytes()))))
    sources.prepare(other, "mine")
    assert sorted(texts(other, "mine", "validation")) == sorted(validation)


def test_tiny_corpora_still_get_both_splits(tmp_path):
    write(tmp_path / "t/a.txt", "a")
    write(tmp_path / "t/b.txt", "b")
    for fraction in (0.001, 0.999):  # no hash under it / every hash under it
        cfg = data_cfg(tmp_path, mine=src(kind="text", paths=f"{tmp_path}/t/*.txt",
                                          eval_fraction=fraction))
        stats = sources.prepare(cfg, "mine")
        assert stats["train_documents"] == stats["validation_documents"] == 1
        train, validation = both_splits(cfg, "mine")
        assert sorted(train + validation) == ["a", "b"]


def test_second_prepare_returns_stats_without_rebuilding(tmp_path, monkeypatch):
    write(tmp_path / "c/a.txt", "one")
    write(tmp_path / "c/b.txt", b"two \xff")
    write(tmp_path / "c/c.txt", "")
    cfg = data_cfg(tmp_path, mine=src(kind="text", paths=f"{tmp_path}/c/*.txt"))
    first = sources.prepare(cfg, "mine")
    assert first["empty_skipped"] == 1 and first["invalid_utf8_replaced"] == 1
    monkeypatch.setattr(local, "scan", lambda *a: pytest.fail("rebuilt an existing build"))
    monkeypatch.setattr(local.LocalCorpus, "_generate_examples",
                        lambda *a: pytest.fail("rebuilt an existing build"))
    assert sources.prepare(cfg, "mine") == first


def test_edited_files_or_settings_give_a_fresh_build(tmp_path):
    a = write(tmp_path / "c/a.txt", "old a")
    write(tmp_path / "c/b.txt", "b")
    cfg = data_cfg(tmp_path, mine=src(kind="text", paths=f"{tmp_path}/c/*.txt"))
    sources.prepare(cfg, "mine")
    assert len(build_dirs(cfg)) == 1
    write(a, "new a, longer")
    with pytest.raises(FileNotFoundError, match=r"prepare\(data_cfg, 'mine'\)"):
        sources.load(cfg, "mine", "train")  # the old build is not served for the new files
    sources.prepare(cfg, "mine")
    train, validation = both_splits(cfg, "mine")
    assert sorted(train + validation) == ["b", "new a, longer"]
    # Same size, new mtime: still a new build.
    write(a, "new a, LONGER")
    os.utime(a, ns=(1_000_000_000, 1_000_000_000))
    sources.prepare(cfg, "mine")
    assert "new a, LONGER" in texts(cfg, "mine", "train") + texts(cfg, "mine", "validation")
    cfg.sources.mine.eval_fraction = 0.5  # a setting
    sources.prepare(cfg, "mine")
    cfg.sources.other = src(kind="text", paths=f"{tmp_path}/c/*.txt", eval_fraction=0.5)
    sources.prepare(cfg, "other")  # same files and settings, another source: its own build
    dirs = build_dirs(cfg)
    assert len(dirs) == 5 and sum(d.startswith("other-") for d in dirs) == 1


# ---- bad input ----------------------------------------------------------------------------------

def prepare_error(tmp_path, exc=ValueError, **keys):
    cfg = data_cfg(tmp_path, mine=src(**keys))
    with pytest.raises(exc) as info:
        sources.prepare(cfg, "mine")
    assert not build_dirs(cfg)  # nothing built, not even a leftover incomplete directory
    return str(info.value)


def test_glob_or_path_matching_nothing(tmp_path):
    write(tmp_path / "a.txt", "a")
    message = prepare_error(tmp_path, paths=f"{tmp_path}/a.txt,{tmp_path}/nothing/*.txt")
    assert f"{tmp_path}/nothing/*.txt" in message and "data.sources.mine.paths" in message
    message = prepare_error(tmp_path, paths=f"{tmp_path}/a.txt,{tmp_path}/missing.txt")
    assert f"{tmp_path}/missing.txt" in message and "data.sources.mine.paths" in message


def test_unreadable_path(tmp_path):
    write(tmp_path / "a.txt", "a")
    (tmp_path / "adir").mkdir()  # unreadable as a file, even for root
    message = prepare_error(tmp_path, paths=f"{tmp_path}/a.txt,{tmp_path}/adir")
    assert f"{tmp_path}/adir" in message and "data.sources.mine.paths" in message
    if os.geteuid() != 0:  # root reads files whatever their mode
        locked = write(tmp_path / "locked.txt", "secret")
        locked.chmod(0)
        message = prepare_error(tmp_path, paths=f"{tmp_path}/*.txt")
        assert str(locked) in message


def test_bad_json_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n')
    message = prepare_error(tmp_path, kind="jsonl", paths=str(path))
    assert str(path) in message and "line 3" in message and "JSON" in message


def test_jsonl_missing_field(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"body": "x"}\n{"body": "y"}\n{"text": "z"}\n')
    message = prepare_error(tmp_path, kind="jsonl", paths=str(path), text_field="body")
    assert "'body'" in message and str(path) in message and "line 3" in message


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["x", "y"]}), path)
    message = prepare_error(tmp_path, kind="parquet", paths=str(path), text_field="text")
    assert "'text'" in message and str(path) in message


def test_too_few_documents(tmp_path):
    path = write(tmp_path / "a.txt", "only one")
    message = prepare_error(tmp_path, paths=str(path))
    assert "data.sources.mine" in message and "at least 2" in message


def test_unknown_source_and_unbuilt_source(tmp_path):
    cfg = data_cfg(tmp_path, mine=src(paths=str(write(tmp_path / "a.txt", "a"))))
    with pytest.raises(ValueError, match="'nope'"):
        sources.prepare(cfg, "nope")
    with pytest.raises(ValueError, match="'nope'"):
        sources.load(cfg, "nope", "train")
    with pytest.raises(FileNotFoundError, match=r"prepare\(data_cfg, 'mine'\)"):
        sources.load(cfg, "mine", "train")
    with pytest.raises(FileNotFoundError, match=r"prepare\(data_cfg, 'stdlib'\)"):
        sources.load(cfg, "stdlib", "validation")
    with pytest.raises(ValueError, match="'test'"):
        sources.load(cfg, "mine", "test")


# ---- kind=tfds ----------------------------------------------------------------------------------

TINY = {"train": [f"train doc {i}" for i in range(7)], "test": ["held out 1", "held out 2"]}


class JaxlmTestTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for a catalog dataset: sources open prepared datasets from their files,
    so the class needs no registration (and leaves the global registry alone)."""

    VERSION = tfds.core.Version("1.2.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "n": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(docs) for split, docs in TINY.items()}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"content": doc, "n": i}


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("catalog")
    JaxlmTestTiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def tfds_cfg(data_dir, **keys):
    keys = {"kind": "tfds", "tfds_name": "jaxlm_test_tiny", "text_field": "content",
            "eval_split": "test", **keys}
    cfg = config.defaults().data
    cfg.data_dir = str(data_dir)
    cfg.sources = ml_collections.ConfigDict({"cat": keys})
    return cfg


@pytest.mark.parametrize("tfds_name", ["jaxlm_test_tiny", "jaxlm_test_tiny/en:1.2.0"])
def test_tfds_source(catalog_dir, tfds_name):
    cfg = tfds_cfg(catalog_dir, tfds_name=tfds_name)
    assert sources.prepare(cfg, "cat") == {"train_documents": 7, "validation_documents": 2,
                                           "empty_skipped": 0, "invalid_utf8_replaced": 0,
                                           "long_documents_split": 0}
    assert sorted(texts(cfg, "cat", "train")) == sorted(TINY["train"])
    assert sorted(texts(cfg, "cat", "validation")) == sorted(TINY["test"])
    source = sources.load(cfg, "cat", "train")
    assert [r["text"] for r in source.__getitems__([0, 1])] == [source[0]["text"],
                                                               source[1]["text"]]


def test_tfds_split_slices(catalog_dir):
    cfg = tfds_cfg(catalog_dir, train_split="train[:5]", eval_split="train[5:]")
    stats = sources.prepare(cfg, "cat")
    assert (stats["train_documents"], stats["validation_documents"]) == (5, 2)
    assert sorted(texts(cfg, "cat", "train") + texts(cfg, "cat", "validation")) == sorted(
        TINY["train"])


def test_tfds_not_prepared(tmp_path, catalog_dir):
    for cfg in (tfds_cfg(tmp_path, tfds_name="lm1b"),
                tfds_cfg(catalog_dir, tfds_name="jaxlm_test_tiny/en:9.9.9")):
        with pytest.raises(ValueError, match="not prepared under data_dir") as info:
            sources.prepare(cfg, "cat")
        assert cfg.sources.cat.tfds_name in str(info.value)
        assert "array_record" in str(info.value)
        with pytest.raises(FileNotFoundError, match="not prepared"):
            sources.load(cfg, "cat", "train")


def test_tfds_missing_split_or_feature(catalog_dir):
    with pytest.raises(ValueError, match="'validation'") as info:
        sources.prepare(tfds_cfg(catalog_dir, eval_split="validation"), "cat")
    assert "data.sources.cat.eval_split" in str(info.value)
    with pytest.raises(ValueError, match="'dev'"):
        sources.load(tfds_cfg(catalog_dir, train_split="dev"), "cat", "train")
    with pytest.raises(ValueError, match="'text'") as info:
        sources.prepare(tfds_cfg(catalog_dir, text_field="text"), "cat")
    assert "data.sources.cat.text_field" in str(info.value)
    with pytest.raises(ValueError, match="not text"):
        sources.prepare(tfds_cfg(catalog_dir, text_field="n"), "cat")


def test_tfds_needs_array_record(tmp_path, catalog_dir):
    import shutil
    data_dir = tmp_path / "copy"
    shutil.copytree(catalog_dir, data_dir)
    (info_path,) = data_dir.glob("jaxlm_test_tiny/en/1.2.0/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"  # as a default `tfds build` would have written
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="array_record") as excinfo:
        sources.prepare(tfds_cfg(data_dir), "cat")
    assert "tfrecord" in str(excinfo.value)
