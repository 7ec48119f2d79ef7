import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import manifest as mf
from data_prep.schema import CORPUS_SCHEMA, ExampleMetadata, example_schema


def _write_parquet(path, rows):
    table = pa.table(
        {"doc_id": list(range(rows)), "source": ["x"] * rows, "sentences": [["a", "b"]] * rows},
        schema=CORPUS_SCHEMA,
    )
    with mf.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def test_commit_writes_manifest_last_and_skip_when_complete(tmp_path):
    out = tmp_path / "stage"
    stage = mf.begin_stage(out, "shard", {"n": 1}, {"corpus": "abc"}, format_version=1)
    assert not stage.complete
    _write_parquet(stage.path("train/part-00000.parquet"), 3)
    assert mf.read_manifest(out) is None  # not finished: never read downstream
    with pytest.raises(mf.StageError, match="not a finished"):
        mf.require_complete(out, "shard")
    manifest = stage.commit([mf.file_entry(out, "train/part-00000.parquet")], {"documents": 3})
    assert manifest["files"][0]["rows"] == 3
    assert not (out / mf.INPROGRESS).exists()
    assert mf.require_complete(out, "shard")["fingerprint"] == stage.fingerprint
    # Same config and inputs: nothing to do.
    assert mf.begin_stage(out, "shard", {"n": 1}, {"corpus": "abc"}, format_version=1).complete
    # A changed parameter invalidates the directory.
    again = mf.begin_stage(out, "shard", {"n": 2}, {"corpus": "abc"}, format_version=1)
    assert not again.complete
    assert not (out / "train" / "part-00000.parquet").exists()
    assert mf.read_manifest(out) is None


def test_complete_manifest_needs_the_stage_the_fingerprint_and_matching_files(tmp_path):
    out = tmp_path / "stage"
    stage = mf.begin_stage(out, "shard", {"n": 1}, {}, format_version=1)
    _write_parquet(stage.path("train/part-00000.parquet"), 3)
    assert mf.complete_manifest(out, "shard") is None  # unfinished
    stage.commit([mf.file_entry(out, "train/part-00000.parquet")], {})
    assert mf.complete_manifest(out, "shard", stage.fingerprint)["fingerprint"] == stage.fingerprint
    assert mf.complete_manifest(out, "shard")  # any fingerprint
    assert mf.complete_manifest(out, "shard", "another") is None
    assert mf.complete_manifest(out, "vocab") is None
    _write_parquet(out / "train/part-00000.parquet", 2)  # changed after the stage wrote it
    errors = []
    assert mf.complete_manifest(out, "shard", stage.fingerprint, on_mismatch=errors.append) is None
    assert len(errors) == 1 and "re-run bertpipe shard" in str(errors[0])


def test_unfinished_run_with_same_fingerprint_keeps_committed_parts(tmp_path):
    out = tmp_path / "stage"
    stage = mf.begin_stage(out, "shard", {"n": 1}, {}, format_version=1)
    _write_parquet(stage.path("train/part-00000.parquet"), 2)
    # killed here; the re-run keeps part 0 and a run with another config does not
    assert not mf.begin_stage(out, "shard", {"n": 1}, {}, format_version=1).complete
    assert (out / "train" / "part-00000.parquet").exists()
    mf.begin_stage(out, "shard", {"n": 9}, {}, format_version=1)
    assert not (out / "train" / "part-00000.parquet").exists()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    with pytest.raises(RuntimeError), mf.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_changed_rows_and_hash(tmp_path):
    out = tmp_path / "stage"
    stage = mf.begin_stage(out, "shard", {}, {}, format_version=1)
    _write_parquet(stage.path("train/part-00000.parquet"), 4)
    stage.commit([mf.file_entry(out, "train/part-00000.parquet")], {})
    mf.verify(out, check_sha256=True)
    _write_parquet(out / "train/part-00000.parquet", 5)
    with pytest.raises(mf.StageError, match="5 rows but its manifest says 4"):
        mf.require_complete(out, "shard")


def test_refuses_foreign_directory_and_wrong_stage(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(mf.StageError, match="not a bertpipe stage directory"):
        mf.begin_stage(foreign, "shard", {}, {}, format_version=1)
    assert (foreign / "thesis.tex").exists()
    out = tmp_path / "stage"
    mf.begin_stage(out, "vocab", {}, {}, format_version=1).commit([], {})
    with pytest.raises(mf.StageError, match="holds a 'vocab' stage"):
        mf.require_complete(out, "shard")
    with pytest.raises(mf.StageError, match="does not exist"):
        mf.require_complete(tmp_path / "nope", "shard")


def test_arrow_rows_counted_and_metadata_round_trip(tmp_path):
    meta = ExampleMetadata(
        vocab_fingerprint="f" * 64,
        vocab_size=1000,
        special_ids={"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
        max_seq_length=32,
        masking="static",
        masked_lm_prob=0.15,
        max_predictions_per_seq=5,
        whole_word_mask=False,
        seed=1,
    )
    schema = example_schema(meta)
    assert schema.field("input_ids").type == pa.list_(pa.uint16())
    table = pa.table(
        {
            "input_ids": [[2, 10, 3, 11, 3]],
            "token_type_ids": [[0, 0, 0, 1, 1]],
            "next_sentence_label": [0],
            "masked_lm_positions": [[1]],
            "masked_lm_ids": [[10]],
            "a_doc_id": [7],
            "b_doc_id": [7],
        },
        schema=schema,
    )
    path = tmp_path / "part-00000.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)
        writer.write_table(table)
    assert mf.count_rows(path) == 2
    with pa.memory_map(str(path)) as source:
        read = ExampleMetadata.from_arrow(pa.ipc.open_file(source).schema)
    assert read == meta
    problems = read.mismatches(vocab_size=500, special_ids={"mask": 103}, max_position_embeddings=16)
    assert len(problems) == 3, problems
    assert read.mismatches(vocab_size=1000, special_ids=meta.special_ids, max_position_embeddings=512) == []


def test_fingerprint_is_order_independent_for_dicts():
    assert mf.fingerprint({"a": 1, "b": [1, 2]}) == mf.fingerprint(json.loads('{"b": [1, 2], "a": 1}'))
    assert mf.fingerprint({"a": 1}) != mf.fingerprint({"a": 2})


def test_one_writer_per_stage_directory_and_a_dead_holder_is_taken_over(tmp_path):
    """A second writer is refused at once, naming the holder's pid; the lock of a killed holder is taken over."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from data_prep.manifest import StageError, begin_stage, release_writer_lock

    directory = tmp_path / "stage"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from data_prep.manifest import begin_stage; "
         f"begin_stage({str(directory)!r}, 'shard', {{}}, {{}}, 1); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=rf"being written by pid {holder.pid} on "):
            begin_stage(directory, "shard", {}, {}, 1)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    stage = begin_stage(directory, "shard", {}, {}, 1)  # the dead holder's lock is ours now
    assert not stage.complete and (directory / ".inprogress.json").exists()
    stage.commit([], {})
    release_writer_lock(directory)  # committed: released already; a second release is harmless
    begin_stage(directory, "shard", {"other": 1}, {}, 1)  # and a later writer in this process may take it
