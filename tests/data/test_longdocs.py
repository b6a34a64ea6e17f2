"""Documents longer than data.max_document_bytes: cut into pieces by the documented rule, read
in bounded parts, built as pieces by local sources and split by the pipeline; documents under
the limit untouched. (The memory figure for a 1 GB document: `jaxlm bench data
--huge-document-mb 1024`, in the README.)"""

import io
import json
import pathlib
import random

import grain
import ml_collections
import numpy as np
import pytest
from test_pipeline import KEYS, assert_batches_equal, reference_rows

from jaxlm import config
from jaxlm.data import longdocs, packing, pipeline, sources
from jaxlm.data.sources import SourceError, local
from jaxlm.data.tokenizers import ByteTokenizer

LIMIT = 64


def reference_pieces(data: bytes, limit: int = LIMIT) -> list[bytes]:
    """The rule as documented: a piece ends after the last newline in the second half of
    its `limit` bytes, else at the last UTF-8 character boundary at or before `limit`."""
    pieces = []
    while len(data) > limit:
        newline = data[:limit].rfind(b"\n")
        if newline >= limit // 2:
            end = newline + 1
        else:
            end = next((p for p in range(limit, limit - 4, -1) if not 0x80 <= data[p] < 0xC0),
                       limit)
        pieces.append(data[:end])
        data = data[end:]
    return pieces + [data] if data else pieces


def sample_text(rng: random.Random, n: int) -> bytes:
    parts = [b"a", b"bc", b" ", b"\n", "é".encode(), "€".encode(), "😀".encode(), b"xyz" * 7]
    return b"".join(rng.choice(parts) for _ in range(n))


def data_cfg(tmp_path, limit=LIMIT, **named_sources):
    cfg = config.defaults().data
    cfg.data_dir = str(tmp_path / "tfds")
    cfg.max_document_bytes = limit
    cfg.sources = ml_collections.ConfigDict(
        {name: ml_collections.ConfigDict(keys) for name, keys in named_sources.items()})
    return cfg


def records(cfg, name):
    """(path, index, text bytes) of every record of both splits, with the split's name."""
    found = []
    for split in ("train", "validation"):
        source = sources.load(cfg, name, split)
        found += [(split, source[i]["path"].decode(), int(source[i]["index"]), source[i]["text"])
                  for i in range(len(source))]
    return found


# ---- the cut rule -----------------------------------------------------------------------------

def test_cuts_follow_the_documented_rule_however_the_bytes_arrive():
    rng = random.Random(0)
    for _ in range(400):
        data = sample_text(rng, rng.randint(0, 120)) + bytes([rng.choice([0x80, 0xff, 0x41])])
        limit = rng.choice([4, 5, 8, 13, 32, 1000])
        expected = reference_pieces(data, limit)
        assert [data[a:b] for a, b in longdocs.spans(data, limit)] == (expected or [b""])
        cutter, got, at = longdocs.Cutter(limit), [], 0
        while at < len(data):  # fed in parts of random sizes
            size = rng.randint(1, 9)
            got += cutter.feed(data[at:at + size])
            at += size
        got += cutter.finish()
        assert got == expected
        assert b"".join(got) == data and all(0 < len(p) <= limit for p in got)


class Spy(io.BytesIO):
    """A file that refuses to be read whole."""

    def __init__(self, data, most):
        super().__init__(data)
        self.most = most

    def read(self, size=-1):
        assert 0 < size <= self.most, size
        return super().read(size)

    def readline(self, size=-1):
        assert 0 < size <= self.most, size
        return super().readline(size)


def test_readers_read_in_bounded_parts():
    rng = random.Random(1)
    lines = [b"L" + sample_text(rng, 20).replace(b"\n", b"") for _ in range(300)]
    first = b"\n".join(lines) + b"\n" + b"q" * 5000  # ~15 KB of lines, then a long one,
    data = first + b"\n\n" + b" " * 3000 + b"\nlast"  # a long blank one and another block
    pieces = list(longdocs.read_pieces(Spy(data, 100), LIMIT, read_bytes=100))
    assert pieces == reference_pieces(data)

    def reread(start, end):
        f = Spy(data, 100)
        f.seek(start)
        while start < end:
            part = f.read(min(100, end - start))
            start += len(part)
            yield part

    blocks = list(longdocs.blank_line_blocks(Spy(data, 100), reread, LIMIT, read_bytes=100))
    last = b"last"
    assert blocks == [(0, k, p) for k, p in enumerate(reference_pieces(first))] + [(1, 0, last)]

    text = sample_text(rng, 2000).decode()
    line = json.dumps({"id": 7, "text": text, "more": {"x": [1, "]"]}}).encode()
    f = Spy(line + b"\n", 100)
    head = f.readline(LIMIT + 1)
    pieces = list(longdocs.LongJsonLine(f, head, "text", LIMIT, read_bytes=100).pieces())
    assert pieces == [p.decode() for p in reference_pieces(text.encode())]


# ---- local sources: built as pieces -----------------------------------------------------------

def test_long_text_file_is_built_as_pieces_and_kept_together(tmp_path):
    rng = random.Random(2)
    long = sample_text(rng, 400)  # ~1 KB: 20-odd pieces of at most 64 bytes
    (tmp_path / "c").mkdir()
    (tmp_path / "c/long.txt").write_bytes(long)
    small = {"a.txt": b"short one", "b.txt": b"x" * LIMIT}  # exactly the limit: untouched
    for name, data in small.items():
        (tmp_path / "c" / name).write_bytes(data)
    cfg = data_cfg(tmp_path, mine={"kind": "text", "paths": f"{tmp_path}/c/*.txt",
                                       "eval_fraction": 0.5})
    stats = sources.prepare(cfg, "mine")
    pieces = reference_pieces(long)
    assert len(pieces) > 10 and b"".join(pieces) == long
    got = records(cfg, "mine")
    assert sorted(r[3] for r in got) == sorted(pieces + list(small.values()))
    assert len({split for split, path, _, _ in got if path == "long.txt"}) == 1  # together
    assert stats["long_documents_split"] == 1
    assert stats["train_documents"] + stats["validation_documents"] == len(pieces) + 2
    tokenizer = ByteTokenizer()  # the pieces' tokens, in order, are the document's
    np.testing.assert_array_equal(np.concatenate([tokenizer.encode_bytes(p) for p in pieces]),
                                  tokenizer.encode_bytes(long))


def test_long_block_of_blank_line_text(tmp_path, monkeypatch):
    monkeypatch.setattr(longdocs, "READ_BYTES", 16)  # long lines take the streaming path
    long_block = b"\r\n".join(sample_text(random.Random(3), 40).replace(b"\n", b" ")
                              for _ in range(6)) + b"\r"
    data = b"\xef\xbb\xbffirst block\n \t\n" + long_block + b"\n" + b" " * 40 + b"\nend\n"
    (tmp_path / "t.txt").write_bytes(data)
    cfg = data_cfg(tmp_path, mine={"kind": "text", "paths": str(tmp_path / "t.txt"),
                                       "split_by": "blank_line"})
    stats = sources.prepare(cfg, "mine")
    expected = [b"first block", *reference_pieces(long_block[:-1]), b"end"]
    assert sorted(r[3] for r in records(cfg, "mine")) == sorted(expected)
    assert stats["long_documents_split"] == 1


def test_long_jsonl_line_is_streamed_into_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(longdocs, "READ_BYTES", 16)
    monkeypatch.setattr(longdocs, "_SEGMENT_BYTES", 10)  # decoded in many segments
    text = "line one\n\"quoted\" \\ é€😀 " * 12
    escaped = json.dumps(text, ensure_ascii=False)[1:-1] + json.dumps("😀é/")[1:-1]  # \ud83d..
    text = json.loads(f'"{escaped}"')
    lines = ['{"meta": {"a": [1, 2.5, null, "}"]}, "text": "' + escaped + '", "n": 1}',
             json.dumps({"text": "next"}),
             json.dumps({"text": "after", "pad": "p" * 200})]  # long, its text short
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = data_cfg(tmp_path, mine={"kind": "jsonl", "paths": str(tmp_path / "a.jsonl")})
    stats = sources.prepare(cfg, "mine")
    pieces = reference_pieces(text.encode())
    got = records(cfg, "mine")
    assert sorted(r[3] for r in got) == sorted(pieces + [b"next", b"after"])
    assert {r[3]: r[2] for r in got}[b"next"] == 1  # documents are still numbered by line
    assert {r[3]: r[2] for r in got}[b"after"] == 2
    assert stats["long_documents_split"] == 1 and stats["invalid_utf8_replaced"] == 0

    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": 5, "pad": "p" * 100}) + "\n")
    cfg = data_cfg(tmp_path, bad={"kind": "jsonl", "paths": str(tmp_path / "bad.jsonl")})
    with pytest.raises(SourceError, match=r"bad\.jsonl, line 1 .*field 'text' is a number"):
        sources.prepare(cfg, "bad")


def test_long_lines_parse_as_json_does(monkeypatch):
    """Random records through the stream parser, in parts of 1-7 bytes: the text field is
    json.loads(line)[field] (lone surrogates replaced), cut by the rule."""
    monkeypatch.setattr(longdocs, "_SEGMENT_BYTES", 3)
    monkeypatch.setattr(longdocs, "_CAPTURE_BYTES", 10)
    rng = random.Random(4)
    alphabet = ["a", " ", "\n", "\t", "é", "€", "😀", "\\", '"', "\x01", "\ud83d", "\ude00", "/"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50)))
        fields = {"id": rng.randint(-9, 10**6), "text": text, "m": {"a": [1, "]}"], "b": {}}}
        keys = list(fields)
        rng.shuffle(keys)
        line = json.dumps({k: fields[k] for k in keys}, ensure_ascii=rng.random() < 0.5)
        raw = line.encode("utf-8", "surrogatepass")
        limit = rng.choice([4, 7, 16])
        f = io.BytesIO(raw + b'\n{"next": 1}\n')
        parsed = longdocs.LongJsonLine(f, f.readline(limit + 1), "text", limit,
                                       read_bytes=rng.randint(1, 7))
        got = list(parsed.pieces())
        expected = json.loads(raw.decode("utf-8", "replace"))["text"]
        expected = expected.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        assert got == [p.decode() for p in reference_pieces(expected.encode(), limit)]
        assert f.read() == b'{"next": 1}\n'  # the line, and only the line, was read
    for bad, error in [(b'[1, 2]', "got list"), (b'{"text": "a", "text": "b"}', "twice"),
                       (b'{"a": 01, "text": "x"}', "not valid JSON"),
                       (b'{"text": "a\\x"}', "invalid escape"), (b'{"text": "a"} x', "extra"),
                       (b'{"b": "c"}', "no field 'text'"), (b'{"text": "abc', "unterminated")]:
        f = io.BytesIO(bad + b"\n")
        with pytest.raises(longdocs.DocumentError, match=error):
            list(longdocs.LongJsonLine(f, f.readline(5), "text", 4, read_bytes=3).pieces())


def test_long_parquet_value_is_built_as_pieces(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    long = sample_text(random.Random(5), 300)
    pq.write_table(pa.table({"body": [b"one", long, None, b"two"]}), tmp_path / "a.parquet")
    cfg = data_cfg(tmp_path, mine={"kind": "parquet", "paths": str(tmp_path / "a.parquet"),
                                       "text_field": "body"})
    stats = sources.prepare(cfg, "mine")
    assert sorted(r[3] for r in records(cfg, "mine")) == sorted(
        reference_pieces(long) + [b"one", b"two"])
    assert stats["long_documents_split"] == 1 and stats["empty_skipped"] == 1


def test_limit_counts_in_the_build_only_when_a_file_could_exceed_it(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 100)
    (tmp_path / "b.txt").write_bytes(b"b" * 10)
    spec = config.source_defaults()
    spec.update(kind="text", paths=f"{tmp_path}/*.txt")
    names = {limit: local.resolve("s", spec, limit).name for limit in (100, 4096, 2**20, 99)}
    assert names[100] == names[4096] == names[2**20]  # the build made before the limit existed
    assert names[99] != names[100]  # a.txt may now be cut: another build


# ---- the pipeline: a long record of a catalog dataset -----------------------------------------

def long_record_stream(texts, limit):
    ds = grain.MapDataset.source([{"text": t} for t in texts])
    return ds.map(pipeline._Tokenize(ByteTokenizer(), limit)).to_iter_dataset()


def test_pipeline_splits_a_long_record_into_documents():
    rng = random.Random(6)
    texts = [b"abc", sample_text(rng, 120), b"", b"defgh" * 3, sample_text(rng, 90)]
    seq_len = 16
    rows = [packing.shift_row(*r)
            for r in packing.PackedRows(long_record_stream(texts, LIMIT), seq_len + 1, "concat")]
    as_documents = [p for t in texts for p in reference_pieces(t)]
    assert len(as_documents) > len(texts)
    assert_batches_equal({k: np.stack([r[k] for r in rows]) for k in KEYS},
                         reference_rows(as_documents, seq_len, len(rows)))

    def rows_from(state, n):
        it = packing.PackedRows(long_record_stream(texts, LIMIT), seq_len + 1, "concat").__iter__()
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(n)], it.get_state()

    whole, _ = rows_from(None, len(rows))
    for k in range(1, len(rows)):  # every restore point, inside pieces too
        _, state = rows_from(None, k)
        rest, _ = rows_from(json.loads(json.dumps(state)), len(rows) - k)
        for a, b in zip(whole[k:], rest):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)

    packed = packing.PackedRows(long_record_stream(texts, LIMIT), seq_len + 1, "first_fit")
    tokens = sorted(t for row in packed for t in row[0][row[1] > 0].tolist())
    assert tokens == sorted(t for d in as_documents for t in [1, *(b + 3 for b in d), 2])


def test_records_under_the_limit_are_tokenized_whole():
    texts = [b"x" * LIMIT, "é".encode() * (LIMIT // 2)]
    split = pipeline._Tokenize(ByteTokenizer(), LIMIT)
    for text in texts:
        np.testing.assert_array_equal(split({"text": text}), [1, *(b + 3 for b in text), 2])


def test_a_state_is_refused_under_another_limit(stdlib_data_dir):
    cfg = config.defaults().data
    cfg.update(data_dir=stdlib_data_dir, seq_len=32, global_batch_size=2)
    it = pipeline.make_iterator(cfg)
    next(it)
    state = it.get_state()
    it.close()
    assert "max_document_bytes" not in state["meta"]  # as states saved before the key existed
    cfg.max_document_bytes = 2**20
    other = pipeline.make_iterator(cfg)
    with pytest.raises(ValueError, match="max_document_bytes"):
        other.set_state(state)
    other.close()


def test_readme_documents_the_limit():
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    assert "data.max_document_bytes" in readme and "--huge-document-mb" in readme
