"""Readers check what a manifest promises (sizes, small files' sha256; data files' sha256 on request), the
token cache follows the corpus content, and `bertpipe verify` checks a stage directory or a run root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_examples_stage import write_corpus, write_vocab
from typer.testing import CliRunner

from data_prep import reader, tokcache
from data_prep.examples_stage import ExamplesConfig, generate_examples
from data_prep.manifest import (
    INPROGRESS,
    MANIFEST,
    StageError,
    file_entry,
    read_manifest,
    sha256_file,
    verify_source,
)
from data_prep.schema import CORPUS_SCHEMA
from data_prep.vocab import VocabConfig, train_vocab
from flows.cli import app


@pytest.fixture()
def run_root(tmp_path) -> Path:
    """A run root as `bertpipe run` lays it out: corpus (shard), vocab (adopted), examples."""
    root = tmp_path / "run"
    write_corpus(root / "corpus")
    write_vocab(tmp_path / "source-vocab")
    train_vocab(VocabConfig(corpus=root / "corpus", out=root / "vocab", from_path=tmp_path / "source-vocab"))
    generate_examples(examples_config(root, "examples"))
    return root


def examples_config(root: Path, out: str, **kwargs) -> ExamplesConfig:
    values = {"max_seq_length": 32, "cache_dir": root / ".bertpipe-cache", **kwargs}
    return ExamplesConfig(corpus=root / "corpus", vocab=root / "vocab", out=root / out, **values)


def drop_mask(vocab_txt: Path) -> None:
    lines = vocab_txt.read_text().splitlines()
    vocab_txt.write_text("\n".join(line for line in lines if line != "[MASK]") + "\n")


def swap_tokens(vocab_txt: Path) -> None:
    """Swap two tokens: the same size and token set, every id of the two shifted."""
    lines = vocab_txt.read_text().splitlines()
    lines[10], lines[11] = lines[11], lines[10]
    vocab_txt.write_text("\n".join(lines) + "\n")


def test_a_vocab_txt_that_lost_a_token_is_refused_naming_it_and_a_rerun_mends_it(run_root):
    vocab_txt = run_root / "vocab" / "vocab.txt"
    drop_mask(
        vocab_txt
    )  # tokenizer.json untouched: loading it alone would not notice, the copy would shift ids
    with pytest.raises(StageError) as refused:
        generate_examples(examples_config(run_root, "examples2"))
    assert str(refused.value) == (
        f"{vocab_txt} does not match its manifest (1009 bytes, not 1016): the file was changed after the vocab "
        "stage wrote it; re-run bertpipe vocab"
    )
    assert not (run_root / "examples2").exists()  # refused before any work
    with pytest.raises(StageError, match="re-run bertpipe vocab$"):
        verify_source(vocab_txt)  # the file itself, as `pretrain --vocab` may name it
    # The re-run the message asks for rebuilds the stage (its fingerprint matches, its files do not).
    train_vocab(VocabConfig(corpus=run_root / "corpus", out=run_root / "vocab", from_path=run_root.parent / "source-vocab"))  # fmt: skip
    assert "[MASK]" in vocab_txt.read_text().splitlines()
    generate_examples(examples_config(run_root, "examples2"))


def test_the_examples_copy_of_the_vocabulary_is_checked_by_its_readers(run_root):
    from bert.pretrain.data import open_split

    copied = run_root / "examples" / "vocab" / "vocab.txt"
    swap_tokens(copied)
    expected = (
        f"{copied} does not match its manifest (sha256 differs): the file was changed after the examples stage "
        "wrote it; re-run bertpipe examples"
    )
    for read in (
        lambda: open_split(run_root / "examples", "train"),
        lambda: reader.example_files(run_root / "examples"),
    ):
        with pytest.raises(StageError) as refused:
            read()
        assert str(refused.value) == expected


def same_size_edit(part: Path) -> None:
    """Change one sentence of a corpus shard, keeping its rows and its size in bytes (plain, uncompressed)."""
    table = pq.read_table(part)
    rows = table.to_pylist()
    sentence = rows[0]["sentences"][0]
    rows[0]["sentences"][0] = sentence[:-1] + ("x" if sentence[-1] != "x" else "y")
    pq.write_table(
        pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA), part, compression="none", use_dictionary=False
    )


def write_plain_corpus(directory: Path) -> Path:
    """write_corpus, its shards rewritten uncompressed so that a same-length text edit keeps their size."""
    write_corpus(directory)
    manifest = read_manifest(directory)
    for entry in manifest["files"]:
        part = directory / entry["path"]
        pq.write_table(pq.read_table(part), part, compression="none", use_dictionary=False)
        entry.update(file_entry(directory, entry["path"]))
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_a_corpus_shard_edited_keeping_rows_and_size_is_refused_cached_or_not(tmp_path):
    corpus = write_plain_corpus(tmp_path / "corpus")
    vocab = write_vocab(tmp_path / "vocab")
    generate_examples(
        ExamplesConfig(corpus, vocab, tmp_path / "first", max_seq_length=32, cache_dir=tmp_path / "cache")
    )
    part = corpus / "train" / "part-00001.parquet"
    size = part.stat().st_size
    same_size_edit(part)
    assert part.stat().st_size == size and pq.ParquetFile(part).metadata.num_rows == 15
    expected = (
        f"{part} does not match its manifest (sha256 differs): the file was changed after the shard stage wrote "
        f"it; delete {corpus} and re-run bertpipe shard"
    )
    for cache in (
        "cache",
        "fresh-cache",
    ):  # served from the cache before; tokenised under the old fingerprint
        with pytest.raises(StageError) as refused:
            generate_examples(ExamplesConfig(corpus, vocab, tmp_path / cache / "out", max_seq_length=32,
                                             cache_dir=tmp_path / cache))  # fmt: skip
        assert str(refused.value) == expected


def test_the_token_cache_follows_the_corpus_content_not_its_fingerprint(tmp_path):
    # A shard stage fingerprints its raw inputs by path, size and mtime: text edited in place with those kept
    # gives a corpus with the old fingerprint and new content. Its tokens must not come from the old cache.
    first = write_plain_corpus(tmp_path / "first")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    same_size_edit(second / "train" / "part-00001.parquet")
    manifest = read_manifest(second)
    for entry in manifest["files"]:
        entry.update(file_entry(second, entry["path"]))
    (second / MANIFEST).write_text(json.dumps(manifest))
    assert manifest["fingerprint"] == read_manifest(first)["fingerprint"]
    vocab = write_vocab(tmp_path / "vocab")
    cache = tmp_path / "cache"
    for corpus in (first, second):
        generate_examples(ExamplesConfig(corpus, vocab, tmp_path / f"{corpus.name}-out", max_seq_length=32,
                                         cache_dir=cache))  # fmt: skip
    assert len(list(cache.glob("tokens-*"))) == 2
    outputs = [
        sha256_file(tmp_path / f"{name}-out" / "train" / "part-00001.arrow") for name in ("first", "second")
    ]
    assert outputs[0] != outputs[1]


def test_a_cached_corpus_is_hashed_again_only_when_it_changed_after_its_cache(tmp_path, monkeypatch):
    import os

    corpus, vocab = write_corpus(tmp_path / "corpus"), write_vocab(tmp_path / "vocab")
    hashed = []
    monkeypatch.setattr(tokcache, "sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))

    def run(out: str) -> list[str]:
        hashed.clear()
        generate_examples(
            ExamplesConfig(corpus, vocab, tmp_path / out, max_seq_length=32, cache_dir=tmp_path / "cache")
        )
        return sorted(hashed)

    assert len(run("a")) == 4  # tokenised: every shard hashed as it is read
    assert run("b") == []  # cached after the shards last changed: trusted
    part = corpus / "valid" / "part-00000.parquet"
    later = part.stat().st_mtime_ns + 10**12  # touched (or copied) after its cache was written
    os.utime(part, ns=(later, later))
    assert run("c") == ["part-00000.parquet"]  # hashed, matches: the cache is kept (and touched)
    assert run("d") == []


def verify_cli(path: Path):
    return CliRunner().invoke(app, ["verify", str(path)])


def test_verify_command_checks_every_stage_of_a_run_root(run_root):
    ok = verify_cli(run_root)
    assert ok.exit_code == 0, ok.output
    lines = ok.output.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", f"{run_root / name}:"] for name in ("corpus", "examples", "vocab")
    ]
    assert "examples, 8 files" in lines[1]
    one = verify_cli(run_root / "vocab")
    assert one.exit_code == 0 and len(one.output.splitlines()) == 1

    # A same-size change to a data file: only its sha256 shows it, which the readers check on request.
    part = run_root / "examples" / "train" / "part-00000.arrow"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    reader.example_files(run_root / "examples")  # sizes and rows: fine
    (run_root / "vocab" / MANIFEST).unlink()  # and an unfinished stage, as a killed run leaves it
    (run_root / "vocab" / INPROGRESS).write_text(json.dumps({"stage": "vocab", "fingerprint": "f"}))
    bad = verify_cli(run_root)
    assert bad.exit_code == 2, bad.output
    lines = bad.output.splitlines()
    assert lines[0].startswith(f"ok     {run_root / 'corpus'}:")
    assert lines[1] == (
        f"FAILED {run_root / 'examples'}: {part} does not match its manifest (sha256 differs): the file was "
        f"changed after the examples stage wrote it; delete {run_root / 'examples'} and re-run bertpipe examples"
    )
    assert (
        lines[2]
        == f"FAILED {run_root / 'vocab'}: unfinished (no complete manifest.json): re-run bertpipe vocab"
    )
    assert len(lines) == 3 and "Traceback" not in bad.output


def test_verify_command_refuses_a_directory_without_stages(tmp_path):
    result = verify_cli(tmp_path)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "no manifest.json found" in result.output


def test_finetuning_refuses_a_pretrain_export_whose_tokenizer_changed(tmp_path):
    from bert.finetune.features import load_tokenizer
    from bert.model import BertConfig, BertModel
    from data_prep.manifest import begin_stage

    run = tmp_path / "pretrain"
    stage = begin_stage(run, "pretrain", {}, {}, format_version=1)
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(run / "hf")  # fmt: skip
    write_vocab(run / "hf")
    stage.commit([file_entry(run, f"hf/{p.name}") for p in sorted((run / "hf").iterdir())], {})
    load_tokenizer(run / "hf")
    swap_tokens(run / "hf" / "vocab.txt")
    with pytest.raises(
        StageError,
        match=r"hf/vocab.txt does not match its manifest \(sha256 differs\).*re-run bertpipe pretrain$",
    ):
        load_tokenizer(run / "hf")
