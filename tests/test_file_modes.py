"""File modes and leftovers: what bertpipe writes follows the umask, and finished stages hold no temporaries."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import manifest as mf
from data_prep import shard as shard_mod
from data_prep.examples_stage import ExamplesConfig, generate_examples
from data_prep.shard import ShardConfig, shard_corpus
from data_prep.vocab import VocabConfig, train_vocab

# (umask, the mode a file written under it must have, the mode a directory must have)
UMASKS = [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]


@pytest.fixture(params=UMASKS, ids=["umask022", "umask077"])
def umask(request):
    """Run the test under a given umask and restore the old one afterwards; yields the expected modes."""
    value, file_mode, dir_mode = request.param
    old = os.umask(value)
    try:
        yield value, file_mode, dir_mode
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_below(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): mode(p) for p in sorted(directory.rglob("*"))}


def inaugural_slice(shared_data: Path, num_files: int = 3) -> list[Path]:
    """The first few inaugural speeches: a corpus small enough for a test of a few seconds."""
    files = sorted((shared_data / "corpus" / "inaugural").glob("*.txt"))[:num_files]
    assert len(files) == num_files
    return files


def test_current_umask_reads_the_umask_and_leaves_it_alone(umask):
    value, file_mode, dir_mode = umask
    assert mf.current_umask() == value
    assert mf.file_mode() == file_mode and mf.directory_mode() == dir_mode
    assert os.umask(value) == value  # unchanged by the read


def test_current_umask_falls_back_when_proc_is_missing(umask, monkeypatch):
    value, _, _ = umask

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(mf, "open", no_proc, raising=False)
    assert mf.current_umask() == value
    monkeypatch.undo()
    assert os.umask(value) == value  # the fallback set it back


def test_atomic_writes_follow_the_umask(umask, tmp_path):
    _, file_mode, dir_mode = umask
    with mf.atomic_path(tmp_path / "part.parquet") as tmp:
        pq.write_table(pa.table({"x": [1, 2]}), tmp)
    with mf.atomic_path(tmp_path / "vocab.txt") as tmp:
        tmp.write_text("[PAD]\n")
    mf.write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    mf.write_text_atomic(tmp_path / "sub" / "predictions.jsonl", "{}\n")
    assert modes_below(tmp_path) == {
        "manifest.json": file_mode,
        "part.parquet": file_mode,
        "sub": dir_mode,
        "sub/predictions.jsonl": file_mode,
        "vocab.txt": file_mode,
    }


def test_atomic_path_overrides_a_mode_the_writer_chose(umask, tmp_path):
    _, file_mode, _ = umask
    with mf.atomic_path(tmp_path / "weights.bin") as tmp:
        tmp.write_bytes(b"\0")
        tmp.chmod(0o400)  # e.g. a library that copies its source's mode
    assert mode(tmp_path / "weights.bin") == file_mode


def test_shard_vocab_and_examples_stages_follow_the_umask(umask, shared_data, tmp_path):
    _, file_mode, dir_mode = umask
    files = inaugural_slice(shared_data)
    corpus = tmp_path / "corpus"
    shard_corpus(
        ShardConfig(inputs=[str(f) for f in files], out=str(corpus), num_shards=2, valid_fraction=0.2)
    )
    vocab = tmp_path / "vocab"
    manifest = train_vocab(VocabConfig(corpus=str(corpus), out=str(vocab), vocab_size=300, min_frequency=1))
    assert {"vocab.txt", "tokenizer.json"} <= {f["path"] for f in manifest["files"]}
    examples = tmp_path / "examples"
    generate_examples(
        ExamplesConfig(
            corpus=corpus,
            vocab=vocab,
            out=examples,
            max_seq_length=32,
            dupe_factor=1,
            cache_dir=tmp_path / "c",
        )
    )
    assert any(name.endswith(".parquet") for name in modes_below(corpus))
    assert (examples / "vocab" / "vocab.txt").exists()  # in a directory made by mkdtemp (0o700)
    for directory in (corpus, vocab, examples):
        written = modes_below(directory)
        expected = {name: dir_mode if (directory / name).is_dir() else file_mode for name in written}
        assert written == expected
    assert mode(corpus) == dir_mode and mode(vocab) == dir_mode


def test_resumed_stage_drops_leftover_temporaries_and_keeps_committed_parts(tmp_path):
    out = tmp_path / "stage"
    stage = mf.begin_stage(out, "shard", {"n": 1}, {}, format_version=1)
    with mf.atomic_path(stage.path("train/part-00000.parquet")) as tmp:
        pq.write_table(pa.table({"x": [1]}), tmp)
    # killed mid-write: atomic_path's temporary file (and a stage's temporary directory) stay behind
    (out / "train" / ".part-00001.parquet.abc.tmp").write_bytes(b"half")
    (out / ".vocab.xyz.tmp").mkdir()
    (out / ".vocab.xyz.tmp" / "vocab.txt").write_text("half")
    assert (out / mf.INPROGRESS).exists()
    resumed = mf.begin_stage(out, "shard", {"n": 1}, {}, format_version=1)
    assert not resumed.complete
    assert not list(out.rglob(".*.tmp"))
    assert (out / "train" / "part-00000.parquet").exists()  # committed work is reused
    (out / "train" / ".part-00002.parquet.def.tmp").write_bytes(b"stray")
    resumed.commit([mf.file_entry(out, "train/part-00000.parquet")], {})
    assert not list(out.rglob(".*.tmp"))  # a finished directory never holds one
    assert mf.require_complete(out, "shard")


def test_killed_shard_run_finishes_without_temporaries(shared_data, tmp_path, monkeypatch):
    files = [str(f) for f in inaugural_slice(shared_data)]
    out = tmp_path / "corpus"
    config = ShardConfig(inputs=files, out=str(out), num_shards=3, valid_fraction=0.0)
    real_write_shard = shard_mod.write_shard
    calls = []

    def dying_write_shard(stage_dir, shard, config):
        calls.append(shard)
        if len(calls) == 2:
            # a SIGKILL inside atomic_path leaves its temporary file; KeyboardInterrupt would clean it up
            (Path(stage_dir) / "train" / ".part-00001.parquet.abc.tmp").write_bytes(b"half")
            raise KeyboardInterrupt("killed")
        return real_write_shard(stage_dir, shard, config)

    monkeypatch.setattr(shard_mod, "write_shard", dying_write_shard)
    with pytest.raises(KeyboardInterrupt):
        shard_corpus(config)
    assert (out / mf.INPROGRESS).exists() and list(out.rglob(".*.tmp"))
    monkeypatch.setattr(shard_mod, "write_shard", real_write_shard)
    shard_corpus(config)
    mf.require_complete(out, "shard")
    assert not list(out.rglob(".*.tmp"))


def test_data_log_is_line_buffered_so_a_kill_keeps_every_line(tmp_path):
    from bert.pretrain.rank import open_data_log

    log_file = tmp_path / "data_log" / "rank0.jsonl"
    data_log = open_data_log(tmp_path, 0)
    try:
        data_log.write('{"step": 1}\n')
        assert log_file.read_text() == '{"step": 1}\n'  # on disk before close, as a kill would find it
        data_log.write('{"step": 2}\n')
        assert log_file.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    finally:
        data_log.close()
    with open_data_log(tmp_path, 0) as again:  # a resumed run appends
        again.write('{"step": 3}\n')
    assert len(log_file.read_text().splitlines()) == 3
