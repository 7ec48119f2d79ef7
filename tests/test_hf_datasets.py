"""Example shards as Hugging Face users open them (datasets.Dataset.from_file), and the older IPC file layout.

The README's `collate` (section "### examples") is read from the README itself and must build the batches
bertpipe's own Collator builds, and train transformers' BertForPreTraining.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from bert.pretrain.data import Collator, open_split
from data_prep import reader
from data_prep.examples_stage import ExamplesConfig, generate_examples
from data_prep.manifest import (
    ARROW_FILE_MAGIC,
    begin_stage,
    count_rows,
    file_entry,
    open_arrow_ipc,
    read_manifest,
)
from data_prep.schema import example_schema

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from test_examples_stage import write_corpus, write_vocab  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def static_examples(tmp_path_factory) -> Path:
    """A finished `bertpipe examples --masking static` directory made from the toy corpus."""
    tmp = tmp_path_factory.mktemp("hf")
    generate_examples(
        ExamplesConfig(
            corpus=write_corpus(tmp / "corpus"),
            vocab=write_vocab(tmp / "vocab"),
            out=tmp / "examples",
            max_seq_length=32,
            dupe_factor=2,
            masking="static",
            cache_dir=tmp / "cache",
        )
    )
    return tmp / "examples"


def readme_collate():
    """The `collate` function of the README's examples section, defined from the README's own text."""
    text = README.read_text()
    block = re.search(r"```python\n(.*?def collate\(.*?)```", text, re.S)
    assert block, "README.md lost its datasets snippet (def collate) in the examples section"
    source = re.search(r"^def collate\(.*?(?=^\S)", block.group(1), re.S | re.M).group(0)
    namespace = {"torch": torch}
    exec(source, namespace)
    return namespace["collate"]


def parts(directory: Path, split: str = "train") -> list[Path]:
    return reader.example_files(directory, split)


def test_every_part_opens_with_datasets_from_file(static_examples: Path):
    manifest = read_manifest(static_examples)
    rows = {f["path"]: f["rows"] for f in manifest["files"] if f["path"].endswith(".arrow")}
    metadata = reader.read_metadata(static_examples)
    assert len(rows) == 4
    for relpath, num_rows in rows.items():
        path = static_examples / relpath
        assert path.read_bytes()[: len(ARROW_FILE_MAGIC)] != ARROW_FILE_MAGIC  # an IPC stream
        part = datasets.Dataset.from_file(str(path))
        assert len(part) == num_rows > 0
        assert part.column_names == example_schema(metadata).names
    train = list(reader.iter_examples(static_examples, "train"))
    opened = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(p)) for p in parts(static_examples)]
    )
    assert len(opened) == len(train)
    for i in (0, len(train) // 2, len(train) - 1):
        assert opened[i] == train[i]


def test_readme_collate_matches_the_trainers_collator_and_trains_bert(static_examples: Path):
    collate = readme_collate()
    train = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(p)) for p in parts(static_examples)]
    )
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(static_examples / "vocab"))
    indices = np.array([0, 3, 7, 11, 40, 41, 100, len(train) - 1])
    batch = collate([train[int(i)] for i in indices], tokenizer.pad_token_id)

    shards = open_split(static_examples, "train")
    ours = Collator(shards.metadata, seed=0, pad_to_multiple_of=1)(shards, indices, epoch=0)
    assert set(batch) == set(ours)
    for name in ours:
        assert torch.equal(batch[name], ours[name]), name
    assert (batch["labels"] != -100).sum() > len(indices)  # a few predictions per example

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertForPreTraining(config)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1.0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_memory_mapped_stream_shards_are_read_without_a_copy(static_examples: Path):
    path = parts(static_examples)[0]
    with pa.memory_map(str(path)) as source:
        mapped = source.read_buffer()  # the whole map, zero-copy: its address is where the file is mapped
        start, stop = mapped.address, mapped.address + mapped.size
        _, batches = open_arrow_ipc(source)
        buffers = [
            b for batch in batches for column in batch.columns for b in column.buffers() if b is not None
        ]
        assert len(buffers) > 10
        assert all(start <= b.address and b.address + b.size <= stop for b in buffers)


def rewrite_as_ipc_files(examples: Path, out: Path) -> Path:
    """A copy of a finished examples directory in the layout bertpipe wrote before IPC streams (IPC files)."""
    manifest = read_manifest(examples)
    stage = begin_stage(out, "examples", manifest["config"], manifest["inputs"], format_version=1)
    files = []
    for entry in manifest["files"]:
        target = stage.path(entry["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry["path"].endswith(".arrow"):
            with pa.memory_map(str(examples / entry["path"])) as source:
                table = pa.ipc.open_stream(source).read_all()
            with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=64):  # several record batches per file
                    writer.write_batch(batch)
        else:
            shutil.copyfile(examples / entry["path"], target)
        files.append(file_entry(out, entry["path"]))
    stage.commit(files, manifest["stats"])
    return out


def test_older_ipc_file_shards_are_still_read(static_examples: Path, tmp_path: Path):
    old = rewrite_as_ipc_files(static_examples, tmp_path / "old")
    part = old / "train" / "part-00000.arrow"
    assert part.read_bytes()[: len(ARROW_FILE_MAGIC)] == ARROW_FILE_MAGIC
    assert count_rows(part) == count_rows(static_examples / "train" / "part-00000.arrow")
    assert reader.read_metadata(old) == reader.read_metadata(static_examples)
    assert list(reader.iter_examples(old, "valid")) == list(reader.iter_examples(static_examples, "valid"))
    new, legacy = open_split(static_examples, "train"), open_split(old, "train")
    assert len(legacy) == len(new) and legacy.metadata == new.metadata
    assert np.array_equal(legacy.lengths(), new.lengths())
    for i in (0, 63, 64, len(new) - 1):
        for name, value in new[i].items():
            assert np.array_equal(legacy[i][name], value), (i, name)
