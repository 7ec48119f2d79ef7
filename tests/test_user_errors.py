"""User mistakes are one line naming the file or flag, exit 2, before any work (never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import make_training_stage
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[1]


def refused(*args: str, contains: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert contains in result.output and "Traceback" not in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    return result.output


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "corpus"
    CliRunner().invoke(app, ["shard", "--input", str(shared_data / "corpus/inaugural/1789-Washington.txt"),
                             "--input", str(shared_data / "corpus/inaugural/1793-Washington.txt"),
                             "--out", str(out), "--num-shards", "1", "--doc-boundary", "file"])  # fmt: skip
    assert (out / "manifest.json").exists()
    return out


def test_paths_that_are_files(corpus, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused("shard", "--input", str(corpus), "--out", str(a_file / "sub"), "--num-shards", "1",
            contains="which is a file")  # fmt: skip
    refused("vocab", "--corpus", str(corpus / "manifest.json"), "--out", str(tmp_path / "v"),
            contains="is a file, not a 'shard' stage directory")  # fmt: skip
    refused("examples", "--corpus", str(corpus), "--vocab", str(tmp_path), "--out", str(tmp_path / "e"),
            "--max-seq-length", "64", "--cache-dir", str(a_file), contains="--cache-dir")  # fmt: skip


def test_a_truncated_shard_and_a_binary_vocab_are_named(corpus, tmp_path):
    import shutil

    damaged = tmp_path / "corpus"
    shutil.copytree(corpus, damaged)
    part = damaged / "train/part-00000.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    refused("vocab", "--corpus", str(damaged), "--out", str(tmp_path / "v"), contains=str(part))
    binary = tmp_path / "vocab.txt"
    binary.write_bytes(b"[PAD]\n\xff\xfe\x00\x81garbage\n")
    refused("examples", "--corpus", str(corpus), "--vocab", str(binary), "--out", str(tmp_path / "e"),
            "--max-seq-length", "64", contains=str(binary))  # fmt: skip


def test_pretrain_flags_and_configs_are_checked_before_any_rank_starts(tmp_path):
    examples, model_config = make_training_stage(tmp_path, num_train=16, num_valid=8)
    common = ["pretrain", "--examples", str(examples), "--max-steps", "2"]
    refused(
        *common, "--out", str(tmp_path / "a"), "--num-gpus", "0", contains="--num-gpus must be at least 1"
    )
    bad = tmp_path / "bad-model.json"
    bad.write_text("{not json")
    refused(*common, "--out", str(tmp_path / "b"), "--model-config", str(bad), contains=str(bad))
    conflicting = tmp_path / "ds.json"
    conflicting.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 0}})
    )
    refused(*common, "--out", str(tmp_path / "c"), "--model-config", str(model_config), "--micro-batch-size", "4",
            "--deepspeed-config", str(conflicting), contains="train_micro_batch_size_per_gpu")  # fmt: skip
    assert not (tmp_path / "c" / "launch_config.json").exists()  # refused before the launcher was built


def test_finetune_longer_than_the_model_is_refused_before_reading_data(tmp_path):
    from bert.model import BertConfig, BertModel

    model = tmp_path / "model"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(model)  # fmt: skip
    refused("finetune", "--task", "cola", "--model", str(model), "--train", str(tmp_path / "missing.tsv"),
            "--out", str(tmp_path / "o"), "--max-seq-length", "128",
            contains="max_seq_length 128 exceeds the 64 positions")  # fmt: skip


def test_a_vocab_size_the_corpus_cannot_fill_is_said(corpus, tmp_path):
    result = CliRunner().invoke(app, ["vocab", "--corpus", str(corpus), "--out", str(tmp_path / "v"),
                                      "--vocab-size", "100000000"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "note: asked for 100000000 tokens; this corpus gives" in result.output


def test_a_language_the_sentence_splitter_does_not_know_is_refused(shared_data, tmp_path):
    # sentencex splits any unknown code with English rules, without a word.
    source = str(shared_data / "corpus/inaugural/1789-Washington.txt")
    refused("shard", "--input", source, "--out", str(tmp_path / "a"), "--num-shards", "1", "--language", "xx-klingon",
            contains="--language xx-klingon: the sentence splitter (sentencex) does not know this code")  # fmt: skip
    refused("shard", "--input", source, "--out", str(tmp_path / "b"), "--num-shards", "1", "--language", "en-US",
            contains="give en")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    from data_prep.shard import ShardConfig

    for code, used in (("en", "en"), ("zh", "zh"), ("pt-BR", "pt-br"), ("de-at", "de-at"), ("tr", "tr")):
        assert (
            ShardConfig(inputs=[source], out=str(tmp_path / "c"), num_shards=1, language=code).language
            == used
        )


def test_a_binary_finetune_file_is_named_in_one_line(shared_data, tmp_path):
    from bert.model import BertConfig, BertModel

    model = tmp_path / "model"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(model)  # fmt: skip
    (model / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a"]) + "\n"
    )
    binary = tmp_path / "eval.tsv"
    binary.write_bytes(bytes(range(256)) * 8)
    train = str(shared_data / "cola" / "train.tsv")
    common = ["finetune", "--task", "cola", "--model", str(model), "--out", str(tmp_path / "o")]
    refused(*common, "--train", train, "--eval", str(binary),
            contains=f"{binary}: not UTF-8 text (byte 0x80 cannot be decoded)")  # fmt: skip
    refused(*common, "--train", str(binary), "--eval", train, contains=f"{binary}: not UTF-8 text")
    squad = [
        "finetune",
        "--task",
        "squad",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "q"),
        "--max-seq-length",
        "64",
    ]
    refused(
        *squad,
        "--train",
        str(binary),
        "--eval",
        str(binary),
        contains="give the train data as a UTF-8 SQuAD JSON",
    )


def test_a_one_document_corpus_is_warned_about_once(tmp_path, caplog):
    from test_examples_stage import write_corpus, write_vocab

    from data_prep import reader
    from data_prep.examples_stage import ExamplesConfig, generate_examples

    corpus = write_corpus(tmp_path / "corpus", num_docs=1, shards=(("train", 1),))
    config = ExamplesConfig(corpus, write_vocab(tmp_path / "vocab"), tmp_path / "out", max_seq_length=32)
    with caplog.at_level("WARNING"):
        stats = generate_examples(config)["stats"]
    warning = (
        "the train split holds 1 document: with fewer than 2 documents, random next segments come from the same "
        "document"
    )
    assert [r.getMessage() for r in caplog.records if "fewer than 2 documents" in r.getMessage()] == [
        stats["warnings"][0]
    ]
    assert len(stats["warnings"]) == 1 and stats["warnings"][0].startswith(warning)
    rows = list(reader.iter_examples(tmp_path / "out", "train"))
    assert rows and {(r["a_doc_id"], r["b_doc_id"]) for r in rows} == {(rows[0]["a_doc_id"],) * 2}
