"""The shard stage's write pass sorts a shard a digest range at a time: the files are those of one sort."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep import shard as shard_mod
from data_prep.shard import ShardConfig, shard_corpus


def corpus(path: Path, rng: np.random.Generator) -> Path:
    """150 documents of random words as JSONL, with exact copies and near copies (one word changed) among them."""
    words = [f"w{i}" for i in range(400)]
    docs = []
    for _ in range(150):
        sentences = [" ".join(rng.choice(words, rng.integers(6, 14))).capitalize() + "." for _ in range(6)]
        docs.append(" ".join(sentences))
    docs += docs[:10]  # exact copies
    for doc in docs[10:20]:  # near copies: one word of ~60 replaced
        tokens = doc.split(" ")
        tokens[len(tokens) // 2] = "changed"
        docs.append(" ".join(tokens))
    order = rng.permutation(len(docs))
    path.write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in order), encoding="utf-8")
    return path


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of a stage directory but its manifest (which records the time)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.mark.slow
def test_sorting_by_digest_ranges_writes_the_same_bytes(tmp_path, monkeypatch):
    source = corpus(tmp_path / "in.jsonl", np.random.default_rng(0))
    monkeypatch.setattr(shard_mod, "ROW_GROUP_DOCUMENTS", 7)  # row groups cut across the ranges' edges

    def run(name: str) -> dict:
        config = ShardConfig(inputs=[str(source)], out=str(tmp_path / name), num_shards=2, valid_fraction=0.2)
        return shard_corpus(config)

    whole = run("whole")
    seen = []
    real_ranges = shard_mod._digest_ranges

    def counted_ranges(spills, work_dir):
        tables = list(real_ranges(spills, work_dir))
        seen.append(len(tables))
        assert not work_dir.exists()  # the range files are removed
        yield from tables

    monkeypatch.setattr(shard_mod, "_digest_ranges", counted_ranges)
    monkeypatch.setattr(shard_mod, "WRITE_RANGE_BYTES", 2_000)  # ~50 ranges a shard ...
    monkeypatch.setattr(shard_mod, "WRITE_MAX_RANGES", 6)  # ... capped at 6
    ranged = run("ranged")
    assert seen == [6, 6]  # each shard was really sorted in pieces, as many as the cap allows
    assert whole["stats"]["dropped"] == ranged["stats"]["dropped"]
    assert whole["stats"]["dropped"]["duplicate"] == 10 and whole["stats"]["dropped"]["near_duplicate"] >= 3
    assert whole["stats"]["splits"] == ranged["stats"]["splits"]
    assert file_hashes(tmp_path / "whole") == file_hashes(tmp_path / "ranged")
    groups = pq.ParquetFile(tmp_path / "ranged" / "train" / "part-00000.parquet").metadata
    assert groups.num_row_groups > 5 and groups.row_group(0).num_rows == 7
