"""Near-duplicate removal in the shard stage: edited copies of real documents found and dropped, distinct
documents kept, the survivor a function of content only, the list file, the off switch, Chinese text; the
on-disk pass against the in-memory reference, and signatures independent of batching and cutting."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from data_prep import neardup
from data_prep.shard import NEAR_DUPLICATES, ShardConfig, expected_fingerprint, shard_corpus
from flows.cli import app

SPEECHES = ("1933-Roosevelt.txt", "1961-Kennedy.txt", "1981-Reagan.txt", "2005-Bush.txt")


def location(source: str) -> tuple[str, int]:
    """(file name, record) of a document's source ``PATH:LINE`` or ``PATH#RECORD``."""
    path, number = re.match(r"(.*)[:#](\d+)$", source).groups()
    return Path(path).name, int(number)


def corpus_ids(out: Path) -> set[int]:
    return {
        i for part in out.glob("*/part-*.parquet") for i in pq.read_table(part).column("doc_id").to_pylist()
    }


def near_duplicates(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / NEAR_DUPLICATES).read_text(encoding="utf-8").splitlines()]


def edited_speeches(shared_data: Path, directory: Path, copy_prefix: str = "copy-") -> dict[str, str]:
    """Every speech of the inaugural corpus, plus edited copies of four: {copy file: original file}."""
    directory.mkdir(parents=True)
    for speech in sorted((shared_data / "corpus" / "inaugural").glob("*.txt")):
        shutil.copy(speech, directory / speech.name)
    copies = {}
    for n, name in enumerate(SPEECHES):
        paragraphs = (directory / name).read_text(encoding="latin-1").split("\n\n")
        if n % 2:  # a paragraph dropped
            paragraphs.pop(len(paragraphs) // 2)
        else:  # a few words changed
            paragraphs = [
                p.replace(" the ", " this ", 1) if i % 7 == 3 else p for i, p in enumerate(paragraphs)
            ]
        (directory / f"{copy_prefix}{name}").write_text(
            "\n\n".join(paragraphs), encoding="latin-1"
        )  # bytes as read
        copies[f"{copy_prefix}{name}"] = name
    return copies


def shard(inputs: Path, out: Path, **kwargs) -> dict:
    kwargs.setdefault("num_shards", 3)
    return shard_corpus(ShardConfig(inputs=[str(inputs)], out=str(out), doc_boundary="file", **kwargs))


def test_edited_copies_of_real_documents_are_dropped_and_listed_with_their_original(shared_data, tmp_path):
    copies = edited_speeches(shared_data, tmp_path / "in")
    manifest = shard(tmp_path / "in", tmp_path / "out")
    num_speeches = len(list((shared_data / "corpus" / "inaugural").glob("*.txt")))

    assert manifest["stats"]["dropped"]["near_duplicate"] == len(copies)
    assert manifest["stats"]["documents"] == num_speeches  # every distinct speech kept, one of each pair
    assert NEAR_DUPLICATES in [f["path"] for f in manifest["files"]]
    listed = near_duplicates(tmp_path / "out")
    pairs = {frozenset(location(r[key])[0] for key in ("source", "duplicate_of_source")) for r in listed}
    assert pairs == {frozenset(pair) for pair in copies.items()}
    kept = corpus_ids(tmp_path / "out")
    for record in listed:
        assert record["doc_id"] not in kept and record["duplicate_of"] in kept
        assert 0.8 <= record["similarity"] <= 1.0
        # the survivor is the smaller content digest, hence the smaller id
        assert record["duplicate_of"] < record["doc_id"]


def test_survivor_does_not_depend_on_input_order_workers_or_shards(shared_data, tmp_path):
    edited_speeches(shared_data, tmp_path / "a", copy_prefix="0-")  # copies read before their originals
    edited_speeches(shared_data, tmp_path / "b", copy_prefix="z-")  # ... and after them
    first = shard(tmp_path / "a", tmp_path / "out-a", num_shards=1, workers=1)
    second = shard(tmp_path / "b", tmp_path / "out-b", num_shards=4, workers=2)

    def id_pairs(out: Path) -> list[tuple[int, int]]:
        return [(r["doc_id"], r["duplicate_of"]) for r in near_duplicates(out)]

    assert (
        id_pairs(tmp_path / "out-a") == id_pairs(tmp_path / "out-b")
        and len(id_pairs(tmp_path / "out-a")) == 4
    )
    assert corpus_ids(tmp_path / "out-a") == corpus_ids(tmp_path / "out-b")
    assert first["stats"]["dropped"] == second["stats"]["dropped"]


def test_off_switch_keeps_near_duplicates(shared_data, tmp_path):
    copies = edited_speeches(shared_data, tmp_path / "in")
    on = ShardConfig(
        inputs=[str(tmp_path / "in")], out=str(tmp_path / "on"), num_shards=2, doc_boundary="file"
    )
    off = ShardConfig(**{**vars(on), "out": str(tmp_path / "off"), "near_dup_threshold": 0.0})
    assert expected_fingerprint(on) != expected_fingerprint(off)
    result = CliRunner().invoke(
        app,
        ["shard", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "off"), "--num-shards", "2"]
        + ["--doc-boundary", "file", "--no-near-dup"],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "off" / "manifest.json").read_text())
    assert manifest["stats"]["dropped"]["near_duplicate"] == 0
    assert manifest["stats"]["documents"] == len(list((tmp_path / "in").glob("*.txt")))
    assert not (tmp_path / "off" / NEAR_DUPLICATES).exists()
    assert manifest["fingerprint"] == expected_fingerprint(off)
    assert len(copies) == 4


def test_threshold_is_checked():
    with pytest.raises(ValueError, match="--near-dup-threshold"):
        ShardConfig(inputs=["x"], out="y", num_shards=1, near_dup_threshold=1.2)


def test_chinese_near_duplicates_are_found_with_character_shingles(shared_data, tmp_path):
    lines = (shared_data / "corpus_zh" / "fortunes-zh.jsonl").read_text(encoding="utf-8").splitlines()[:400]
    documents = [json.loads(line) for line in lines]
    originals = [i for i, d in enumerate(documents) if len(d["text"]) > 600][:3]
    copies = []
    for i in originals:  # a few characters changed: still the same text
        text = documents[i]["text"].replace("的", "之", 3)
        assert text != documents[i]["text"]
        copies.append({"id": documents[i]["id"] + "-edited", "text": text})
    path = tmp_path / "zh.jsonl"
    path.write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents + copies), encoding="utf-8"
    )

    manifest = shard_corpus(
        ShardConfig(inputs=[str(path)], out=str(tmp_path / "out"), num_shards=2, language="zh")
    )
    listed = near_duplicates(tmp_path / "out")
    found = {frozenset(location(r[key])[1] for key in ("source", "duplicate_of_source")) for r in listed}
    planted = {frozenset((i, len(documents) + n)) for n, i in enumerate(originals)}  # records count from 0
    assert planted <= found
    assert manifest["stats"]["dropped"]["near_duplicate"] == len(listed) >= len(originals)
    # Chinese has no spaces: its shingle units are characters, so a sentence is many units, not one
    assert neardup.units("要有礼貌，请接受这一事实") == list("要有礼貌请接受这一事实")


def test_a_dropped_document_names_a_kept_one_and_the_rank_decides():
    words = [f"w{i}" for i in range(140)]
    a, b, c = words[0:100], words[10:110], words[20:120]  # shingles: J(a,b) = J(b,c) = 0.81, J(a,c) = 0.66
    signatures, _ = neardup.signatures([[" ".join(doc)] for doc in (a, b, c)])

    dropped, kept, _ = neardup.find_near_duplicates(signatures, np.array([0, 1, 2]), 0.74)
    assert (dropped.tolist(), kept.tolist()) == ([1], [0])  # b goes; c stays: its only match went
    dropped, kept, _ = neardup.find_near_duplicates(signatures, np.array([2, 1, 0]), 0.74)
    assert (dropped.tolist(), kept.tolist()) == ([1], [2])


def planted_corpus(rng: np.random.Generator) -> list[list[str]]:
    """Random documents, edited copies (some of copies, several of one original), exact copies, and a
    templated family sharing its first 60 words: many pairs, chains and crowded LSH buckets."""
    vocabulary = [f"w{i}" for i in range(3000)]
    documents = [[" ".join(rng.choice(vocabulary, size=200))] for _ in range(400)]
    for _ in range(150):
        words = documents[rng.integers(len(documents))][0].split()
        for position in rng.integers(0, len(words), size=rng.integers(1, 5)):
            words[position] = "edited"
        documents.append([" ".join(words)])
    template = " ".join(rng.choice(vocabulary, size=60))
    documents += [[template + " " + " ".join(rng.choice(vocabulary, size=15))] for _ in range(30)]
    documents += [list(documents[i]) for i in rng.integers(0, len(documents), size=40)]
    return documents


def test_on_disk_pass_keeps_exactly_the_survivors_of_the_in_memory_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    documents = planted_corpus(rng)
    signatures, signed = neardup.signatures(documents)
    text_digests = {}  # exact copies share a digest, as the shard stage's content digest
    digests = np.array(
        [text_digests.setdefault(documents[i][0], rng.integers(0, 2**63, 2)) for i in signed], np.uint64
    )
    # the in-memory reference: distinct documents, ranked by digest
    _, distinct = np.unique(digests, axis=0, return_index=True)  # sorted by (high, low)
    dropped, kept, similarity = neardup.find_near_duplicates(
        signatures[distinct], np.arange(len(distinct)), 0.8
    )
    assert len(dropped) > 100  # most edited copies, some chained

    monkeypatch.setattr(neardup, "_PARTITION_ROWS", 97)  # many partitions, blocks and verify steps
    monkeypatch.setattr(neardup, "_VERIFY_PAIRS", 13)
    cuts = [0, 1, 250, 251, 600, len(signed)]
    batches = [(digests[a:b], signatures[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    on_disk = neardup.find_near_duplicates_on_disk(batches, 0.8, tmp_path / "work")

    expected = (digests[distinct][dropped], digests[distinct][kept], similarity)
    assert all(np.array_equal(got, want) for got, want in zip(on_disk, expected, strict=True))
    assert not (tmp_path / "work").exists()


def test_signature_does_not_depend_on_the_batch_or_on_cutting_a_long_document(monkeypatch):
    text = (Path(__file__).parent / "test_near_dup.py").read_text(encoding="utf-8")  # mixed punctuation
    mixed = ["Ünïcode Straße, ΣΟΦΊΑ: 要有礼貌，请接受这一事实 — and_more 42!", *text.splitlines()]
    alone, _ = neardup.signatures([mixed])
    together, signed = neardup.signatures([["too short"], mixed, ["a b c d e f"]])
    assert signed.tolist() == [1, 2] and np.array_equal(alone[0], together[0])

    # every shingle of the string definition is hashed, distinct ones to distinct hashes
    hashes, counts = neardup.shingle_hashes(neardup._pieces(neardup._unit_bytes(mixed)))
    assert counts.tolist() == [len(neardup.shingles(mixed))]
    assert len(set(hashes.tolist())) == len(set(neardup.shingles(mixed)))

    monkeypatch.setattr(neardup, "_PIECE_BYTES", 300)  # now hashed in many overlapping pieces
    assert len(neardup._pieces(neardup._unit_bytes(mixed))) > 10
    cut, _ = neardup.signatures([mixed])
    assert np.array_equal(cut, alone)
    giant = ["x" * 1000 + " one two three four five six " + "y" * 700]  # units longer than a piece
    pieces = neardup._pieces(neardup._unit_bytes(giant))  # ends: cutting does not stall on them
    assert {unit for piece in pieces for unit in piece.decode().split()} == set(giant[0].split())
    assert neardup.signatures([giant])[1].tolist() == [0]
