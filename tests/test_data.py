"""bert/data.py: memory-mapped shards, rank → indices, collation, static and dynamic masking.

``make_vocab`` / ``make_examples`` build small example stages directly (pyarrow + the schema contract), so
these tests and tests/test_pretrain*.py do not depend on the examples stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from bert.finetune.tasks import IGNORE_INDEX
from bert.pretrain.data import (
    Collator,
    DataPosition,
    ExampleShards,
    RankBatches,
    dynamic_mask,
    epoch_order,
    open_split,
    rank_micro_batches,
)
from data_prep.manifest import begin_stage, file_entry
from data_prep.schema import (
    SPECIAL_TOKENS,
    ExampleMetadata,
    example_schema,
    replacement_ids,
    vocab_fingerprint,
)

NUM_WORDS = 95  # vocabulary: 5 special tokens + w0..w94 = 100 ids
# The model the pretraining tests train: 2 layers, 32 wide, over the 100-id test vocabulary.
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


def make_vocab(directory: Path, num_words: int = NUM_WORDS, prefix: str = "w") -> Path:
    """A vocab directory with vocab.txt: [PAD] [UNK] [CLS] [SEP] [MASK] then ``prefix``0.. words."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = list(SPECIAL_TOKENS) + [f"{prefix}{i}" for i in range(num_words)]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return directory


def _segment(rng: np.random.Generator, length: int, num_words: int) -> list[int]:
    # Learnable text: mostly a cycle through 10 words ("next = previous + 1"), 10% noise over the vocabulary.
    start = int(rng.integers(0, 10))
    words = [(start + i) % 10 for i in range(length)]
    noise = rng.random(length) < 0.1
    words = [int(rng.integers(0, num_words)) if n else w for w, n in zip(words, noise, strict=True)]
    return [5 + w for w in words]


def make_examples(
    directory: Path,
    vocab_dir: Path,
    num_train: int = 96,
    num_valid: int = 32,
    max_seq_length: int = 32,
    masking: str = "dynamic",
    num_shards: int = 2,
    seed: int = 0,
    num_words: int = NUM_WORDS,
) -> Path:
    """A finished examples stage in ``directory`` with train/ and valid/ Arrow shards."""
    tokens = (vocab_dir / "vocab.txt").read_text().split("\n")[:-1]
    specials = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    metadata = ExampleMetadata(
        vocab_fingerprint=vocab_fingerprint(tokens),
        vocab_size=len(tokens),
        special_ids=specials,
        max_seq_length=max_seq_length,
        masking=masking,
        masked_lm_prob=0.15,
        max_predictions_per_seq=5,
        whole_word_mask=False,
        seed=seed,
        lowercase=True,
    )
    schema = example_schema(metadata)
    stage = begin_stage(directory, "examples", {"vocab": str(vocab_dir), "seed": seed}, {}, 1)
    rng = np.random.default_rng(seed)
    files = []
    for split, count in (("train", num_train), ("valid", num_valid)):
        per_shard = [len(part) for part in np.array_split(np.arange(count), num_shards)]
        for shard, rows in enumerate(per_shard):
            columns = {name: [] for name in schema.names}
            for _ in range(rows):
                total = int(rng.integers(8, max_seq_length - 2))
                len_a = int(rng.integers(2, total - 1))
                a, b = _segment(rng, len_a, num_words), _segment(rng, total - len_a, num_words)
                ids = [2, *a, 3, *b, 3]
                types = [0] * (len_a + 2) + [1] * (len(b) + 1)
                positions, originals = [], []
                if masking == "static":
                    candidates = [i for i, t in enumerate(ids) if t >= 5]
                    positions = sorted(
                        rng.choice(candidates, size=min(5, len(candidates)), replace=False).tolist()
                    )
                    originals = [ids[p] for p in positions]
                    for p in positions:
                        ids[p] = 4
                columns["input_ids"].append(ids)
                columns["token_type_ids"].append(types)
                columns["next_sentence_label"].append(int(rng.integers(0, 2)))
                columns["masked_lm_positions"].append(positions)
                columns["masked_lm_ids"].append(originals)
                columns["a_doc_id"].append(0)
                columns["b_doc_id"].append(0)
            relpath = f"{split}/part-{shard:05d}.arrow"
            path = stage.path(relpath)
            path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pydict(columns, schema=schema)
            with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
                for batch in table.to_batches(max_chunksize=16):  # several record batches per file
                    writer.write_batch(batch)
            files.append(file_entry(directory, relpath))
    stage.commit(files, {"examples": num_train + num_valid})
    return directory


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    return make_examples(tmp_path / "examples", make_vocab(tmp_path / "vocab"))


def test_random_access_matches_a_plain_read(examples: Path):
    shards = open_split(examples, "train")
    assert len(shards) == 96
    rows = []
    for path in sorted((examples / "train").glob("*.arrow")):
        rows += ipc.open_file(pa.memory_map(str(path))).read_all().to_pylist()
    for i in (0, 15, 16, 47, 48, 95):
        example = shards[i]
        assert example["input_ids"].tolist() == rows[i]["input_ids"]
        assert example["token_type_ids"].tolist() == rows[i]["token_type_ids"]
        assert example["next_sentence_label"] == rows[i]["next_sentence_label"]
    assert shards.lengths().tolist() == [len(r["input_ids"]) for r in rows]
    with pytest.raises(IndexError):
        shards[96]


def test_shards_of_different_runs_are_refused(tmp_path: Path):
    vocab = make_vocab(tmp_path / "vocab")
    a = make_examples(tmp_path / "a", vocab, max_seq_length=32)
    b = make_examples(tmp_path / "b", vocab, max_seq_length=48)
    with pytest.raises(ValueError, match="other settings"):
        ExampleShards([a / "train/part-00000.arrow", b / "train/part-00000.arrow"])


def test_ranks_get_disjoint_shares_of_every_global_batch():
    order = epoch_order(100, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(100))
    assert not np.array_equal(order, epoch_order(100, seed=3, epoch=1))
    assert np.array_equal(order, epoch_order(100, seed=3, epoch=0))
    global_batch = order[:24]
    shares = [
        rank_micro_batches(global_batch, r, 3, micro_batch_size=4, accumulation_steps=2) for r in range(3)
    ]
    assert all(len(s) == 2 and all(len(m) == 4 for m in s) for s in shares)
    flat = np.concatenate([np.concatenate(s) for s in shares])
    assert sorted(flat.tolist()) == sorted(global_batch.tolist())
    with pytest.raises(ValueError, match="expected 24"):
        rank_micro_batches(order[:20], 0, 3, 4, 2)


def test_length_bucketing_sorts_windows_and_keeps_every_example():
    lengths = np.random.default_rng(0).integers(5, 60, size=64)
    order = epoch_order(64, seed=1, epoch=0, global_batch_size=8, bucket_batches=4, lengths=lengths)
    assert sorted(order.tolist()) == list(range(64))
    spreads = [np.ptp(lengths[order[i : i + 8]]) for i in range(0, 64, 8)]
    random_spreads = [np.ptp(lengths[i : i + 8]) for i in range(0, 64, 8)]
    assert np.mean(spreads) < np.mean(random_spreads) / 2


def test_stream_resumes_at_the_exact_next_batch_and_wraps_epochs(examples: Path):
    shards = open_split(examples, "train")
    stream = RankBatches(shards, seed=0, rank=1, world_size=2, micro_batch_size=4, accumulation_steps=2)
    assert stream.batches_per_epoch == 6
    seen = [stream.next() for _ in range(8)]
    assert [epoch for epoch, _ in seen] == [0] * 6 + [1] * 2
    resumed = RankBatches(shards, 0, 1, 2, 4, 2, position=DataPosition(epoch=0, cursor=4 * 16))
    for expected in seen[4:]:
        epoch, batches = resumed.next()
        assert epoch == expected[0]
        assert all(np.array_equal(a, b) for a, b in zip(batches, expected[1], strict=True))


def test_static_collation_pads_to_a_multiple_of_8_and_labels_only_predictions(tmp_path: Path):
    examples = make_examples(tmp_path / "ex", make_vocab(tmp_path / "vocab"), masking="static")
    shards = open_split(examples, "train")
    batch = Collator(shards.metadata, seed=0, pad_to_multiple_of=8)(shards, np.array([0, 1, 2]), epoch=0)
    lengths = [len(shards[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape[1] == -(-max(lengths) // 8) * 8
    for row in range(3):
        example = shards[row]
        assert batch["attention_mask"][row].sum() == lengths[row]
        assert (batch["input_ids"][row, lengths[row] :] == 0).all()
        labelled = (batch["labels"][row] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert labelled == example["masked_lm_positions"].tolist()
        assert batch["labels"][row, labelled].tolist() == example["masked_lm_ids"].tolist()
        assert batch["next_sentence_label"][row] == example["next_sentence_label"]


def test_dynamic_masking_is_80_10_10_never_special_and_reproducible():
    rng = np.random.default_rng(0)
    special = np.arange(5)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]"] + ["w"] * 94
    replace = replacement_ids(
        tokens, {name: i for i, name in enumerate(["pad", "unk", "cls", "sep", "mask"])}
    )
    assert 5 not in replace and 6 in replace and len(replace) == 94
    kinds = {"mask": 0, "random": 0, "same": 0}
    for _ in range(400):
        ids = np.concatenate([[2], rng.integers(5, 100, 40), [3], rng.integers(5, 100, 20), [3]])
        masked, positions, originals = dynamic_mask(ids, rng, special, replace, 4, 0.15, 20)
        assert len(positions) == 9 and np.all(np.diff(positions) > 0)
        assert not np.isin(ids[positions], special).any()
        assert np.array_equal(ids[positions], originals)
        assert np.array_equal(np.delete(masked, positions), np.delete(ids, positions))
        changed = masked[positions]
        assert not np.isin(changed[changed != 4], np.arange(4)).any()  # never a special token but [MASK]
        kinds["mask"] += int((changed == 4).sum())
        kinds["same"] += int((changed == originals).sum())
        kinds["random"] += int(((changed != 4) & (changed != originals)).sum())
    total = sum(kinds.values())
    assert 0.77 < kinds["mask"] / total < 0.83
    assert 0.07 < kinds["random"] / total < 0.13


def test_whole_word_dynamic_masking_takes_whole_words():
    special = np.arange(5)
    is_continuation = np.zeros(20, dtype=bool)
    is_continuation[[11, 12]] = True  # ids 11, 12 are "##" pieces
    ids = np.array([2, 10, 11, 12, 6, 7, 10, 11, 3])
    for seed in range(30):
        _, positions, _ = dynamic_mask(ids, np.random.default_rng(seed), special, np.arange(5, 20), 4, 0.5, 4,
                                       is_continuation)  # fmt: skip
        chosen = set(positions.tolist())
        assert ({1, 2, 3} <= chosen) or not ({1, 2, 3} & chosen)
        assert ({6, 7} <= chosen) or not ({6, 7} & chosen)


def test_dynamic_masking_depends_on_example_and_epoch_not_on_batching(examples: Path):
    shards = open_split(examples, "train")
    collator = Collator(shards.metadata, seed=7, pad_to_multiple_of=1)
    together = collator(shards, np.array([5, 9]), epoch=2)
    alone = collator(shards, np.array([9]), epoch=2)
    n = int(alone["attention_mask"].sum())
    assert together["input_ids"][1, :n].tolist() == alone["input_ids"][0, :n].tolist()
    assert together["labels"][1, :n].tolist() == alone["labels"][0, :n].tolist()
    other_epoch = collator(shards, np.array([9]), epoch=3)
    assert other_epoch["labels"].tolist() != alone["labels"].tolist()


def make_training_stage(root: Path, num_train: int, num_valid: int) -> tuple[Path, Path]:
    """(a finished examples stage, a model config.json with TINY shapes) under ``root``, for launcher tests."""
    from bert.model import BertConfig

    examples = make_examples(
        root / "examples", make_vocab(root / "vocab"), num_train=num_train, num_valid=num_valid
    )
    model_config = root / "model.json"
    BertConfig.preset("tiny", vocab_size=NUM_WORDS + 5, **TINY).to_json_file(model_config)
    return examples, model_config
