"""The shard stage: readers, sentence splitting, placement, dedupe, resumability and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from data_prep import shard as shard_mod
from data_prep.manifest import MANIFEST, StageError, require_complete
from data_prep.schema import CORPUS_SCHEMA
from data_prep.sentences import split_sentences
from data_prep.shard import ShardConfig, placement, shard_corpus
from data_prep.textio import paragraphs_of
from flows.cli import app

BOOK = """The first chapter begins here. It is
hard-wrapped across lines.

A second paragraph! Does it end? Yes.

   \t
Third paragraph, one sentence only.
"""


def run(tmp_path: Path, inputs, name: str = "out", **kwargs) -> dict:
    kwargs.setdefault("num_shards", 3)
    kwargs.setdefault("valid_fraction", 0.0)
    return shard_corpus(ShardConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / name), **kwargs))


def rows(out: Path, split: str | None = None) -> list[dict]:
    result = []
    for part in sorted(out.glob(f"{split or '*'}/part-*.parquet")):
        table = pq.read_table(part)
        assert table.schema.equals(CORPUS_SCHEMA)
        result.extend(table.to_pylist())
    return result


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_paragraphs_join_wrapped_lines_and_sentences_are_split():
    paragraphs = paragraphs_of(BOOK)
    assert paragraphs == [
        "The first chapter begins here. It is hard-wrapped across lines.",
        "A second paragraph! Does it end? Yes.",
        "Third paragraph, one sentence only.",
    ]
    stats = Counter()
    assert split_sentences(paragraphs[1], "en", 2000, stats) == [
        "A second paragraph!",
        "Does it end?",
        "Yes.",
    ]
    assert not stats


def test_doc_boundary_blank_line_vs_file(tmp_path):
    book = write(tmp_path / "in" / "book.txt", BOOK)
    run(tmp_path, [book], "blocks")
    by_block = rows(tmp_path / "blocks")
    assert sorted(len(r["sentences"]) for r in by_block) == [1, 2, 3]
    assert sorted(r["source"] for r in by_block) == [f"{book}:1", f"{book}:4", f"{book}:7"]
    run(tmp_path, [book], "file", doc_boundary="file")
    (whole,) = rows(tmp_path / "file")
    assert whole["sentences"] == [
        "The first chapter begins here.",
        "It is hard-wrapped across lines.",
        "A second paragraph!",
        "Does it end?",
        "Yes.",
        "Third paragraph, one sentence only.",
    ]


def test_jsonl_parquet_and_gz_inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    records = [
        {"text": "Alpha one. Alpha two."},
        {"text": "   "},
        {"body": "no text field"},
        {"text": "Beta one."},
    ]
    (src / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    pq.write_table(pa.table({"text": ["Gamma one. Gamma two.", None]}), src / "b.parquet")
    with gzip.open(src / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Delta one. Delta two.\n\nEpsilon one.\n")
    with gzip.open(src / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "Zeta one."}) + "\n")
    (src / "notes.md").write_text("Skipped: unknown suffix inside a directory.")
    manifest = run(tmp_path, [src])
    by_source = {r["source"]: r["sentences"] for r in rows(tmp_path / "out")}
    assert by_source == {
        f"{src}/a.jsonl#0": ["Alpha one.", "Alpha two."],
        f"{src}/a.jsonl#3": ["Beta one."],
        f"{src}/b.parquet#0": ["Gamma one.", "Gamma two."],
        f"{src}/c.txt.gz:1": ["Delta one.", "Delta two."],
        f"{src}/c.txt.gz:3": ["Epsilon one."],
        f"{src}/d.jsonl.gz#0": ["Zeta one."],
    }
    stats = manifest["stats"]
    assert stats["dropped"]["empty"] == 1
    assert stats["dropped"]["bad_records"] == 3  # no text field, invalid JSON, a null Parquet value
    assert stats["input_units"] == 4


def test_parquet_without_text_column_names_the_columns(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(StageError, match="content.*--text-field"):
        run(tmp_path, [tmp_path / "b.parquet"])
    run(tmp_path, [tmp_path / "b.parquet"], "other", text_field="content")
    assert rows(tmp_path / "other")[0]["sentences"] == ["x"]


def test_saved_dataset_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["One here. Two here.", "Three here."]}).save_to_disk(single)
    splits = tmp_path / "corpus" / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["Four here."]}),
            "test": datasets.Dataset.from_dict({"text": ["Five."]}),
        }
    ).save_to_disk(splits)
    run(tmp_path, [single, tmp_path / "corpus"])
    by_source = {r["source"]: r["sentences"] for r in rows(tmp_path / "out")}
    assert by_source == {
        f"{single}#0": ["One here.", "Two here."],
        f"{single}#1": ["Three here."],
        f"{splits}/test#0": ["Five."],
        f"{splits}/train#0": ["Four here."],
    }


def test_hf_uri_streams_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"text": "Hub doc one. Second sentence."}, {"text": "Hub doc two."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    manifest = run(tmp_path, ["hf://wikitext:wikitext-2-raw-v1@validation"])
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", True)]
    assert manifest["stats"]["documents"] == 2
    assert {r["source"] for r in rows(tmp_path / "out")} == {
        "hf://wikitext:wikitext-2-raw-v1@validation#0",
        "hf://wikitext:wikitext-2-raw-v1@validation#1",
    }


def _corpus(tmp_path: Path, num_files: int = 6) -> list[Path]:
    files = []
    for i in range(num_files):
        docs = [f"File {i} document {j} starts. It goes on for {i * j} words." for j in range(12)]
        files.append(write(tmp_path / "in" / f"f{i}.txt", "\n\n".join(docs) + "\n"))
    return files


def _tables(out: Path) -> dict[str, pa.Table]:
    return {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.glob("*/part-*.parquet"))}


def test_output_identical_for_any_workers_and_input_order(tmp_path):
    files = _corpus(tmp_path)
    one = run(tmp_path, files, "one", valid_fraction=0.3, workers=1)
    two = run(tmp_path, files[::-1], "two", valid_fraction=0.3, workers=2)
    tables_one, tables_two = _tables(tmp_path / "one"), _tables(tmp_path / "two")
    assert tables_one.keys() == tables_two.keys() and len(tables_one) == 6
    for name, table in tables_one.items():
        assert table.equals(tables_two[name]), name
        ids = table.column("doc_id").to_pylist()
        assert ids == sorted(ids)
    assert one["stats"] == two["stats"]
    assert one["stats"]["splits"]["valid"]["documents"] > 0


def test_row_groups_are_bounded_by_documents_and_text_bytes():
    docs = [["a" * 10] * 3, ["b" * 40], [], ["c" * 5, "d" * 5], ["e" * 100], ["f"]]
    table = pa.table({"sentences": pa.array(docs, pa.list_(pa.string()))})
    # 30, 40, 0, 10, 100, 1 bytes: groups fill up to 50 bytes or 2 rows; a bigger document stands alone
    assert shard_mod.row_group_bounds(table, 2, 50) == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6)]
    assert shard_mod.row_group_bounds(table, 100, 80) == [(0, 4), (4, 5), (5, 6)]
    assert shard_mod.row_group_bounds(table, 100, 1000) == [(0, 6)]
    assert shard_mod.row_group_bounds(table.slice(0, 0), 2, 50) == []


def test_shard_row_groups_bounded_by_bytes_hold_the_same_rows(tmp_path, monkeypatch):
    files = _corpus(tmp_path)
    run(tmp_path, files, "default", valid_fraction=0.3)
    monkeypatch.setattr(shard_mod, "ROW_GROUP_BYTES", 200)
    monkeypatch.setattr(shard_mod, "ROW_GROUP_DOCUMENTS", 5)
    run(tmp_path, files, "small", valid_fraction=0.3)
    default, small = _tables(tmp_path / "default"), _tables(tmp_path / "small")
    assert default.keys() == small.keys()
    for name, table in default.items():
        assert small[name].equals(table), name
        metadata = pq.ParquetFile(tmp_path / "small" / name).metadata
        assert pq.ParquetFile(tmp_path / "default" / name).metadata.num_row_groups == 1
        assert metadata.num_row_groups >= max(1, -(-table.num_rows // 5))
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            assert rows <= 5
            sentences = pq.ParquetFile(tmp_path / "small" / name).read_row_group(group).column("sentences")
            text = sum(len(s.encode()) for doc in sentences.to_pylist() for s in doc)
            assert text <= 200 or rows == 1


def test_exact_duplicates_are_dropped_keeping_the_smallest_source(tmp_path):
    a = write(tmp_path / "in" / "a.txt", "Same text here.\nWrapped.\n\nUnique one.\n")
    b = write(tmp_path / "in" / "b.txt", "Same   text here. Wrapped.\n\nUnique two.\n")
    manifest = run(tmp_path, [b, a])
    docs = rows(tmp_path / "out")
    assert manifest["stats"]["dropped"]["duplicate"] == 1
    assert manifest["stats"]["documents"] == len(docs) == 3
    assert [r["source"] for r in docs if r["sentences"][0] == "Same text here."] == [f"{a}:1"]


def test_placement_depends_on_content_and_seed_only(tmp_path):
    digest = bytes(range(16))
    assert placement(digest, 0, 8, 0.1) == placement(digest, 0, 8, 0.1)
    shards = {placement(bytes([i]) * 16, 0, 4, 0.0)[0] for i in range(64)}
    assert shards == {0, 1, 2, 3}
    assert sum(placement(bytes([i, 1]) * 8, 0, 4, 0.25)[1] for i in range(256)) in range(40, 90)
    # adding a file does not move the documents already there, and doc_ids do not depend on the seed
    files = _corpus(tmp_path, 3)
    run(tmp_path, files[:2], "before")
    run(tmp_path, files, "after")
    run(tmp_path, files[:2], "seeded", seed=7)
    before = {r["doc_id"]: p for p, t in _tables(tmp_path / "before").items() for r in t.to_pylist()}
    after = {r["doc_id"]: p for p, t in _tables(tmp_path / "after").items() for r in t.to_pylist()}
    seeded = {r["doc_id"]: p for p, t in _tables(tmp_path / "seeded").items() for r in t.to_pylist()}
    assert all(after[doc_id] == part for doc_id, part in before.items())
    assert seeded.keys() == before.keys() and seeded != before


def test_latin1_file_is_decoded_and_counted(tmp_path):
    path = tmp_path / "in" / "old.txt"
    path.parent.mkdir()
    path.write_bytes(
        "Caf\u00e9 cr\u00e8me. \u00c7a va \u201cbien\u201d.\n".encode("cp1252") + b"Plain ascii.\n"
    )
    manifest = run(tmp_path, [path])
    (doc,) = rows(tmp_path / "out")
    assert doc["sentences"] == ["Café crème.", "Ça va \u201cbien\u201d.", "Plain ascii."]
    assert manifest["stats"]["decode_fallback_files"] == 1
    assert manifest["stats"]["decode_fallback_lines"] == 1


def test_binary_file_is_skipped_and_counted(tmp_path, caplog):
    write(tmp_path / "in" / "good.txt", "Fine text.\n")
    (tmp_path / "in" / "image.txt").write_bytes(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
    )
    manifest = run(tmp_path, [tmp_path / "in"])
    assert manifest["stats"]["binary_files_skipped"] == 1
    assert manifest["stats"]["documents"] == 1
    assert "image.txt" in caplog.text


def test_truncated_gzip_keeps_earlier_documents_and_is_counted(tmp_path):
    path = tmp_path / "in" / "cut.txt.gz"
    path.parent.mkdir()
    docs = [f"Document number {i} is here. It has two sentences." for i in range(2000)]
    data = gzip.compress("\n\n".join(docs).encode())
    path.write_bytes(data[: len(data) // 2])
    manifest = run(tmp_path, [path])
    assert manifest["stats"]["unreadable_files"] == 1
    assert 0 < manifest["stats"]["documents"] < 2000


@pytest.mark.slow
def test_fifty_megabyte_single_line_is_chunked_quickly(tmp_path):
    path = tmp_path / "in" / "huge.txt"
    path.parent.mkdir()
    line = "lorem ipsum dolor sit amet consectetur " * (50_000_000 // 39)
    path.write_text(line + "\n\nA normal document. With two sentences.\n")
    started = time.monotonic()
    manifest = run(tmp_path, [path], num_shards=1, max_sentence_chars=5000)
    elapsed = time.monotonic() - started
    huge = max(rows(tmp_path / "out"), key=lambda r: len(r["sentences"]))
    assert max(len(s) for s in huge["sentences"]) <= 5000
    assert manifest["stats"]["long_sentences_split"] == 1
    assert manifest["stats"]["words"] == 6 * (50_000_000 // 39) + 6
    assert elapsed < 60, f"sharding a 50 MB line took {elapsed:.1f}s"


def test_short_documents_are_kept_and_counted(tmp_path):
    path = write(tmp_path / "in" / "a.txt", "Only one sentence.\n\nTwo here. Yes two.\n\nAnother single.\n")
    manifest = run(tmp_path, [path])
    assert manifest["stats"]["documents"] == 3
    assert manifest["stats"]["short_documents"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_shards": 0}, "--num-shards 1 or more"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"doc_boundary": "page"}, "blank-line, file"),
        ({"workers": 0}, "workers"),
    ],
)
def test_config_mistakes_say_what_to_change(tmp_path, kwargs, message):
    kwargs = {"num_shards": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ShardConfig(inputs=[str(tmp_path)], out=str(tmp_path / "out"), **kwargs)


def test_empty_corpus_and_missing_path_are_stage_errors(tmp_path):
    write(tmp_path / "in" / "blank.txt", "\n   \n\t\n")
    with pytest.raises(StageError, match="empty corpus"):
        run(tmp_path, [tmp_path / "in"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(StageError, match="no input files"):
        run(tmp_path, [tmp_path / "nothing"], "out2")
    with pytest.raises(StageError, match="does not exist"):
        run(tmp_path, [tmp_path / "missing.txt"], "out3")


def test_killed_half_way_is_finished_by_a_rerun(tmp_path, monkeypatch):
    files = _corpus(tmp_path)
    reference = run(tmp_path, files, "reference", valid_fraction=0.2, num_shards=4)
    real_write_shard = shard_mod.write_shard
    calls = []

    def dying_write_shard(stage_dir, shard, config):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_write_shard(stage_dir, shard, config)

    monkeypatch.setattr(shard_mod, "write_shard", dying_write_shard)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, files, valid_fraction=0.2, num_shards=4)
    out = tmp_path / "out"
    assert not (out / MANIFEST).exists()
    assert not list(out.glob("*/.*.tmp"))  # no half-written part is visible
    assert len(list(out.glob("train/part-*.parquet"))) == 2

    def no_read_task(*args):
        raise AssertionError("read tasks were finished before the kill and must not run again")

    calls.clear()
    monkeypatch.setattr(shard_mod, "read_task", no_read_task)
    manifest = run(tmp_path, files, valid_fraction=0.2, num_shards=4)
    assert calls == [2, 3]  # only the unfinished shards are written
    assert manifest["stats"] == reference["stats"]
    assert [f["sha256"] for f in manifest["files"]] == [f["sha256"] for f in reference["files"]]
    require_complete(out, "shard")
    assert not (out / ".spill").exists()


def test_complete_stage_is_skipped_and_a_changed_parameter_reruns(tmp_path, monkeypatch):
    files = _corpus(tmp_path, 2)
    first = run(tmp_path, files)
    calls = []
    real_read_task = shard_mod.read_task
    monkeypatch.setattr(shard_mod, "read_task", lambda *a: calls.append(a) or real_read_task(*a))
    again = run(tmp_path, files)
    assert again["created_at"] == first["created_at"] and not calls
    changed = run(tmp_path, files, seed=1)
    assert calls and changed["fingerprint"] != first["fingerprint"]
    calls.clear()
    os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))  # an edited input
    touched = run(tmp_path, files, seed=1)
    assert calls and touched["inputs"] != changed["inputs"]


def test_cli_shard_and_one_line_errors(tmp_path):
    files = _corpus(tmp_path, 2)
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "shard",
            "--input",
            str(files[0]),
            "--input",
            str(files[1]),
            "--out",
            str(tmp_path / "o"),
            "--num-shards",
            "2",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "24 documents" in ok.output
    for args in (
        ["--input", str(files[0]), "--num-shards", "0"],
        ["--input", str(tmp_path / "missing"), "--num-shards", "2"],
    ):
        bad = runner.invoke(app, ["shard", *args, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2
        assert "Traceback" not in bad.output and isinstance(bad.exception, SystemExit)
        assert bad.output.strip().startswith("error:") and len(bad.output.strip().splitlines()) == 1
