"""Streaming readers of raw corpora: compressed JSONL and text (.zst, .xz, .bz2) and Parquet directories."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import textio
from data_prep.manifest import StageError
from data_prep.shard import ShardConfig, shard_corpus
from data_prep.textio import discover_inputs, iter_unit_documents

zstandard = pytest.importorskip("zstandard")


def documents(unit: textio.InputUnit, stats: Counter | None = None) -> list[tuple[str, list[str]]]:
    return list(iter_unit_documents(unit, "blank-line", "text", Counter() if stats is None else stats))


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def zst_frames(texts: list[str], per_frame: int = 200) -> bytes:
    """JSONL in one zstd frame per ``per_frame`` records (as pzstd writes): a cut leaves whole frames before it."""
    compress = zstandard.ZstdCompressor().compress
    return b"".join(compress(jsonl(texts[i : i + per_frame])) for i in range(0, len(texts), per_frame))


def test_jsonl_zst_of_several_frames_with_a_cp1252_line(tmp_path):
    path = tmp_path / "in" / "web.jsonl.zst"
    path.parent.mkdir()
    first = jsonl(["Alpha one.\n\nAlpha two.", "Beta one."])
    odd = b'{"text": "Caf\xe9 au lait."}\n'  # not UTF-8: decoded as cp1252, counted
    compress = zstandard.ZstdCompressor().compress
    path.write_bytes(compress(first) + compress(odd))  # two frames, as pzstd or appended streams write
    units, skipped = discover_inputs([str(path.parent)])
    assert [(u.kind, Path(u.location).name) for u in units] == [("jsonl", "web.jsonl.zst")] and not skipped
    stats = Counter()
    assert documents(units[0], stats) == [
        (f"{path}#0", ["Alpha one.", "Alpha two."]),
        (f"{path}#1", ["Beta one."]),
        (f"{path}#2", ["Café au lait."]),
    ]
    assert stats["decode_fallback_lines"] == 1


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_zst_yields_the_records_before_the_damage_then_fails(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(textio, "ZSTD_READ_BYTES", 512)  # several reads: the damage is met late
    texts = [f"Record {i} of many, with words {i * 7919 % 1000} and {i * 104729 % 997}." for i in range(3000)]
    data = zst_frames(texts)
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[: len(data) // 2] + bytes(range(256)) * 8 + data[len(data) // 2 :]
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data)
    unit = discover_inputs([str(path)])[0][0]
    read = []
    with pytest.raises(EOFError if damage == "truncated" else OSError, match="zstd"):
        for _source, paragraphs in iter_unit_documents(unit, "blank-line", "text", Counter()):
            read.append(paragraphs[0])
    assert 0 < len(read) < len(texts) and read == texts[: len(read)]  # streamed: the earlier records came


def test_shard_stage_keeps_the_documents_before_a_truncated_zst(tmp_path):
    texts = [f"Document {i} is here. It has two sentences." for i in range(600)]
    data = zst_frames(texts, per_frame=50)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    manifest = shard_corpus(
        ShardConfig(
            inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), num_shards=1, near_dup_threshold=0
        )
    )
    assert manifest["stats"]["unreadable_files"] == 1
    assert 0 < manifest["stats"]["documents"] < 600


def test_compressed_text_files_are_text_units(tmp_path):
    text = "First document. Two sentences.\n\nSecond document.\n"
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    (src / "b.txt.xz").write_bytes(lzma.compress(text.encode()))
    (src / "c.txt.bz2").write_bytes(bz2.compress(text.encode()))
    (src / "d.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))  # no inner suffix: text
    (src / "e.jsonl.xz").write_bytes(lzma.compress(jsonl(["Xz record."])))
    (src / "f.parquet.zst").write_bytes(b"not streamable")  # a compressed Parquet file: skipped
    units, skipped = discover_inputs([str(src)])
    assert [(Path(u.location).name, u.kind) for u in units] == [
        ("a.txt.zst", "text"),
        ("b.txt.xz", "text"),
        ("c.txt.bz2", "text"),
        ("d.zst", "text"),
        ("e.jsonl.xz", "jsonl"),
    ]
    assert [Path(p).name for p in skipped] == ["f.parquet.zst"]
    for unit in units[:4]:
        assert [p for _, p in documents(unit)] == [["First document. Two sentences."], ["Second document."]]
    assert documents(units[4]) == [(f"{src}/e.jsonl.xz#0", ["Xz record."])]


def test_corrupt_xz_is_an_os_error(tmp_path):
    data = lzma.compress(("Some text line.\n" * 20_000).encode())
    path = tmp_path / "bad.txt.xz"
    path.write_bytes(data[:100] + bytes(64) + data[164:])
    with pytest.raises(OSError, match="xz"):
        documents(discover_inputs([str(path)])[0][0])


def test_parquet_directory_is_read_file_by_file_one_batch_at_a_time(tmp_path, monkeypatch):
    root = tmp_path / "export"
    for year, count in (("2020", 3000), ("2021", 5)):
        (root / f"year={year}").mkdir(parents=True)
        table = pa.table({"text": [f"Row {i} of {year}." for i in range(count)], "url": ["u"] * count})
        pq.write_table(table, root / f"year={year}" / "part-0.snappy.parquet", row_group_size=500)
    (root / "_SUCCESS").write_text("")
    (root / "year=2020" / ".part-0.snappy.parquet.crc").write_text("")
    units, skipped = discover_inputs([str(root)])
    assert [(u.kind, Path(u.location).parent.name) for u in units] == [
        ("parquet", "year=2020"),
        ("parquet", "year=2021"),
    ]
    assert [Path(p).name for p in skipped] == ["_SUCCESS"]
    pulled = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    stream = iter_unit_documents(units[0], "blank-line", "text", Counter())
    assert next(stream) == (f"{units[0].location}#0", ["Row 0 of 2020."])
    assert sum(pulled) < 3000  # the first document came before the file was read whole
    assert len(list(stream)) == 2999 and sum(pulled) == 3000


def test_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(["x"])))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard raises ImportError
    with pytest.raises(StageError, match="pip install zstandard"):
        documents(discover_inputs([str(path)])[0][0])


def test_conll_column_file_is_read_as_its_words(tmp_path):
    """A CoNLL-2003 file (first line -DOCSTART-): each document its sentences, the words of the first column."""
    text = (
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n. . O O\n\nPeter NNP B-NP B-PER\n"
        "Blackburn NNP I-NP I-PER\n\n-DOCSTART- -X- -X- O\n\nThe DT B-NP O\nend NN I-NP O\n"
    )
    path = tmp_path / "train.txt"
    path.write_text(text)
    for boundary in ("blank-line", "file"):  # the markers decide, not --doc-boundary
        assert documents_of(path, boundary) == [
            (f"{path}:3", ["EU rejects .", "Peter Blackburn"]),
            (f"{path}:12", ["The end"]),
        ]
    gz = tmp_path / "train.txt.gz"
    gz.write_bytes(gzip_bytes(text.encode()))
    assert [sentences for _, sentences in documents_of(gz, "blank-line")] == [
        ["EU rejects .", "Peter Blackburn"],
        ["The end"],
    ]
    plain = tmp_path / "plain.txt"
    plain.write_text("Not -DOCSTART- first.\nSecond line\n\nNext paragraph\n")
    assert documents_of(plain, "file") == [
        (f"{plain}:1", ["Not -DOCSTART- first. Second line", "Next paragraph"])
    ]


def documents_of(path: Path, doc_boundary: str) -> list[tuple[str, list[str]]]:
    return list(iter_unit_documents(discover_inputs([str(path)])[0][0], doc_boundary, "text", Counter()))


def test_tsv_rows_of_a_named_column_are_documents(tmp_path):
    """A GLUE-style table (byte-order mark, a quote-led sentence, a short row) read as its text column."""
    path = tmp_path / "in" / "train.tsv"
    path.parent.mkdir()
    rows = ["sentence\tlabel", '"quoted" start , fine \t1', "", "no label column", "second row .\t0"]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    gz = tmp_path / "in" / "more.tsv.gz"
    gz.write_bytes(gzip_bytes(b"sentence\tlabel\nzipped row\t1\n"))
    units, skipped = discover_inputs([str(path.parent)])
    assert [(u.kind, Path(u.location).name) for u in units] == [("tsv", "more.tsv.gz"), ("tsv", "train.tsv")]
    assert not skipped
    stats = Counter()
    assert list(iter_unit_documents(units[1], "blank-line", "sentence", stats)) == [
        (f"{path}#1", ['"quoted" start , fine']),
        (f"{path}#3", ["no label column"]),  # one field: column 0 is there
        (f"{path}#4", ["second row ."]),
    ]
    assert list(iter_unit_documents(units[0], "blank-line", "sentence", stats)) == [
        (f"{gz}#1", ["zipped row"])
    ]
    with pytest.raises(StageError, match=r"no column 'text' \(columns: sentence, label\)"):
        list(iter_unit_documents(units[1], "blank-line", "text", Counter()))
    labels_first = tmp_path / "labels_first.tsv"
    labels_first.write_text("label\tsentence\n1\tkept .\n0\n")
    assert list(
        iter_unit_documents(discover_inputs([str(labels_first)])[0][0], "file", "sentence", stats)
    ) == [(f"{labels_first}#1", ["kept ."])]
    assert stats["bad_records"] == 1  # the row without its second field
