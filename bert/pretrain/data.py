"""Example shards for training: memory-mapped Arrow access, per-rank batches, collation and masking.

The data position of a run is ``(epoch, cursor)``: ``cursor`` counts the samples of the epoch's order
that global batches have consumed. Which examples a rank trains on is a pure function of
``(seed, epoch, cursor, rank, world size, batch sizes)``, so a resumed run continues with exactly the next
batch, and dynamic masking is seeded by ``(seed, epoch, example index)``, so an example is masked the
same way whatever rank or batch it lands in. A global batch and its cut into micro batches depend on the
global and micro batch sizes only, never on the world size: a run resumed on another number of ranks
(accumulation adjusted) averages the gradients of the same micro batches.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data_prep import masking
from data_prep.manifest import open_arrow_ipc, require_complete
from data_prep.schema import WORD_START_COLUMN, ExampleMetadata, continuation_table, replacement_ids

LIST_COLUMNS = ("input_ids", "token_type_ids", "masked_lm_positions", "masked_lm_ids")
OPTIONAL_LIST_COLUMNS = (WORD_START_COLUMN,)  # read where shards have them (dynamic whole-word masking)
IGNORE_INDEX = -100


class ExampleShards:
    """Random access by global index over Arrow IPC example shards, through memory maps (no copy).

    Reads IPC streams (what the examples stage writes) and IPC files (older example directories).
    """

    def __init__(self, paths: list[str | os.PathLike]):
        if not paths:
            raise ValueError("no example shards given")
        self.paths = [Path(p) for p in paths]
        self._sources = []  # the memory maps stay open while the views below are alive
        self._batches: list[dict[str, np.ndarray]] = []
        starts = [0]
        metadata = None
        for path in self.paths:
            source = pa.memory_map(str(path), "r")
            self._sources.append(source)
            schema, batches = open_arrow_ipc(source)
            shard_metadata = ExampleMetadata.from_arrow(schema, where=str(path))
            if metadata is None:
                metadata = shard_metadata
                # equal metadata, equal columns: the first shard's list columns are every shard's
                optional = tuple(name for name in OPTIONAL_LIST_COLUMNS if name in schema.names)
                self._list_columns = LIST_COLUMNS + optional
            elif not shard_metadata.compatible(metadata):
                raise ValueError(
                    f"{path} was generated with other settings than {self.paths[0]} (metadata differs): "
                    "train on shards of one vocabulary, sequence length and masking setup"
                )
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                columns = {}
                for name in self._list_columns:
                    array = batch.column(name)
                    columns[name + ".offsets"] = array.offsets.to_numpy()
                    columns[name] = array.values.to_numpy(zero_copy_only=False)
                columns["next_sentence_label"] = batch.column("next_sentence_label").to_numpy()
                self._batches.append(columns)
                starts.append(starts[-1] + batch.num_rows)
        self.metadata: ExampleMetadata = metadata
        self._starts = starts

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range (0..{len(self) - 1})")
        b = bisect.bisect_right(self._starts, index) - 1
        columns, row = self._batches[b], index - self._starts[b]
        example = {}
        for name in self._list_columns:
            offsets = columns[name + ".offsets"]
            example[name] = columns[name][offsets[row] : offsets[row + 1]]
        example["next_sentence_label"] = int(columns["next_sentence_label"][row])
        return example

    def lengths(self) -> np.ndarray:
        """Tokens per example, in global index order (reads only the offsets)."""
        return np.concatenate([np.diff(c["input_ids.offsets"]) for c in self._batches]).astype(np.int64)


def open_split(examples_dir: str | os.PathLike, split: str) -> ExampleShards | None:
    """The shards of one split of a finished examples directory, in manifest order; None when empty."""
    manifest = require_complete(examples_dir, "examples")
    paths = [
        Path(examples_dir) / f["path"]
        for f in manifest["files"]
        if f["path"].startswith(f"{split}/") and f["path"].endswith(".arrow") and f.get("rows", 1)
    ]
    return ExampleShards(paths) if paths else None


# --- which examples each rank trains on: pure functions ------------------------------------------------


def epoch_order(
    num_examples: int,
    seed: int,
    epoch: int,
    global_batch_size: int = 1,
    bucket_batches: int = 0,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """The order of the examples in ``epoch``: a seeded permutation, optionally length-bucketed.

    With ``bucket_batches > 1`` each window of that many global batches is sorted by length and cut into
    global batches whose order within the window is shuffled: less padding, still a pure function.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    if bucket_batches > 1:
        if lengths is None:
            raise ValueError("length bucketing needs the example lengths")
        window = global_batch_size * bucket_batches
        for start in range(0, num_examples - window + 1, window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches = chunk.reshape(bucket_batches, global_batch_size)
            order[start : start + window] = batches[rng.permutation(bucket_batches)].reshape(-1)
    return order


def rank_micro_batches(
    global_indices: np.ndarray, rank: int, world_size: int, micro_batch_size: int, accumulation_steps: int
) -> list[np.ndarray]:
    """This rank's micro batches of one global batch: micro batch ``j`` is the global batch's ``j``-th run of
    ``micro_batch_size`` examples, and rank ``r`` takes ``r, r + world_size, ...`` (one per accumulation step).

    The micro batches themselves do not depend on the world size: a loss is a mean over a micro batch, so
    the same micro batches on 1 rank × 4 steps or 2 ranks × 2 steps give the same gradient.
    """
    expected = micro_batch_size * accumulation_steps * world_size
    if len(global_indices) != expected:
        raise ValueError(f"a global batch of {len(global_indices)} examples, expected {expected}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    micro = global_indices.reshape(accumulation_steps * world_size, micro_batch_size)  # (micro batches, m)
    return [micro[i * world_size + rank] for i in range(accumulation_steps)]


@dataclass
class DataPosition:
    """Where the next global batch starts: ``cursor`` samples into the order of ``epoch``."""

    epoch: int = 0
    cursor: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


class RankBatches:
    """The stream of one rank's micro batches, global batch by global batch, from a DataPosition."""

    def __init__(
        self,
        dataset: ExampleShards,
        seed: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        accumulation_steps: int,
        bucket_batches: int = 0,
        position: DataPosition | None = None,
    ):
        self.dataset = dataset
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.accumulation_steps = micro_batch_size, accumulation_steps
        self.global_batch_size = micro_batch_size * accumulation_steps * world_size
        self.bucket_batches = bucket_batches
        self.position = position or DataPosition()
        if len(dataset) < self.global_batch_size:
            raise ValueError(
                f"{len(dataset)} training examples are fewer than one global batch of "
                f"{self.global_batch_size}: lower the batch size or generate more examples"
            )
        self._lengths = dataset.lengths() if bucket_batches > 1 else None
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size  # the remainder is dropped, every epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(
                len(self.dataset),
                self.seed,
                epoch,
                self.global_batch_size,
                self.bucket_batches,
                self._lengths,
            )
            self._order_epoch = epoch
        return self._order

    def next(self) -> tuple[int, list[np.ndarray]]:
        """(epoch, this rank's micro batches of global indices) of the next global batch; advances."""
        if self.position.cursor + self.global_batch_size > len(self.dataset):
            self.position = DataPosition(self.position.epoch + 1, 0)
        epoch, cursor = self.position.epoch, self.position.cursor
        global_indices = self._epoch_order(epoch)[cursor : cursor + self.global_batch_size]
        self.position = DataPosition(epoch, cursor + self.global_batch_size)
        return epoch, rank_micro_batches(
            global_indices, self.rank, self.world_size, self.micro_batch_size, self.accumulation_steps
        )


# --- masking and collation ------------------------------------------------------------------------------


def dynamic_mask(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    special_ids: np.ndarray,
    replacement_ids: np.ndarray,
    mask_id: int,
    masked_lm_prob: float,
    max_predictions: int,
    is_continuation: np.ndarray | None = None,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT's 80/10/10 masking of one example by the rule of data_prep/masking.py, the one static masking
    follows: (masked ids, positions ascending, original ids).

    ``special_ids`` ([PAD] [UNK] [CLS] [SEP] [MASK]) are never chosen; the budget counts the whole example;
    random replacements come from ``replacement_ids``. Whole words are masked over ``word_start`` (per
    token, the examples' ``word_start`` column: "##" pieces and segmenter words), or else over "##" pieces
    (``is_continuation``, a bool per vocabulary id).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    offsets = np.array([0, len(ids)], dtype=np.int64)
    candidate = ~np.isin(ids, special_ids)
    if word_start is not None:
        word_start = np.asarray(word_start).astype(bool)
        word_start[:1] = True
    elif is_continuation is not None:
        word_start = masking.word_starts(ids, offsets, candidate, is_continuation)
    positions, _ = masking.choose_predictions(
        ids, offsets, candidate, masked_lm_prob, max_predictions, rng, word_start
    )
    masked = ids.copy()
    originals, _, _ = masking.replace_80_10_10(masked, positions, mask_id, replacement_ids, rng)
    return masked, positions, originals


class Collator:
    """Turns examples into a padded batch of tensors; masks dynamically when the shards are unmasked."""

    def __init__(
        self,
        metadata: ExampleMetadata,
        seed: int,
        pad_to_multiple_of: int = 8,
        tokens: list[str] | None = None,
    ):
        if metadata.masking not in ("static", "dynamic"):
            raise ValueError(f"unknown masking mode {metadata.masking!r} in the examples' metadata")
        self.metadata = metadata
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = metadata.special_ids.get("pad", 0)
        self.mask_id = metadata.special_ids["mask"]
        self.special_ids = np.array(sorted(set(metadata.special_ids.values())), dtype=np.int64)
        self.never_predicted = masking.never_predicted_ids(metadata.special_ids)
        self.dynamic = metadata.masking == "dynamic"
        if tokens is not None:
            self.replacement_ids = replacement_ids(tokens[: metadata.vocab_size], metadata.special_ids)
        else:  # no token strings: every id but the special ones
            self.replacement_ids = np.setdiff1d(np.arange(metadata.vocab_size), self.special_ids)
        self.whole_word = self.dynamic and metadata.whole_word_mask
        self.is_continuation = None
        if self.whole_word and tokens is not None:
            self.is_continuation = continuation_table(tokens)

    def __call__(self, dataset: ExampleShards, indices: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        examples = [dataset[int(i)] for i in indices]
        longest = max(len(e["input_ids"]) for e in examples)
        m = self.pad_to_multiple_of
        length = (longest + m - 1) // m * m
        n = len(examples)
        input_ids = np.full((n, length), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((n, length), dtype=np.int64)
        attention_mask = np.zeros((n, length), dtype=np.int64)
        labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
        nsp = np.zeros(n, dtype=np.int64)
        for row, (index, example) in enumerate(zip(indices, examples, strict=True)):
            ids = np.asarray(example["input_ids"], dtype=np.int64)
            if self.dynamic:
                rng = np.random.default_rng([self.seed, epoch, int(index)])
                ids, positions, originals = dynamic_mask(
                    ids,
                    rng,
                    self.never_predicted,
                    self.replacement_ids,
                    self.mask_id,
                    self.metadata.masked_lm_prob,
                    self.metadata.max_predictions_per_seq,
                    self.is_continuation,
                    self._word_start(example),
                )
            else:
                positions = np.asarray(example["masked_lm_positions"], dtype=np.int64)
                originals = np.asarray(example["masked_lm_ids"], dtype=np.int64)
            k = len(ids)
            input_ids[row, :k] = ids
            token_type_ids[row, :k] = example["token_type_ids"]
            attention_mask[row, :k] = 1
            labels[row, positions] = originals
            nsp[row] = example["next_sentence_label"]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(nsp),
        }

    def _word_start(self, example: dict) -> np.ndarray | None:
        """The example's whole-word boundaries: its ``word_start`` column (written by the examples stage for
        dynamic whole-word masking), else None to group "##" pieces by the vocabulary."""
        if not self.whole_word:
            return None
        word_start = example.get(WORD_START_COLUMN)
        if word_start is not None:
            return word_start
        if self.metadata.word_segmenter is not None:
            raise ValueError(
                f"the examples were segmented into words by {self.metadata.word_segmenter} but this example "
                f"lacks its {WORD_START_COLUMN!r} column: read the shards with a bert.pretrain.data that loads it"
            )
        if self.is_continuation is None:
            raise ValueError("whole-word dynamic masking needs the vocabulary's tokens")
        return None


# --- agreement between examples, tokenizer and model ----------------------------------------------------


def vocab_dir_of(examples_dir: str | os.PathLike, metadata: ExampleMetadata | None = None) -> Path | None:
    """The vocabulary the examples were made with, as recorded by the examples stage, if it was recorded."""
    manifest = require_complete(examples_dir, "examples", verify_rows=False)
    places = [manifest.get("config") or {}, manifest, manifest.get("stats") or {}]
    if metadata is not None:
        places.append(metadata.extra or {})
    for place in places:
        for key in ("vocab", "vocab_dir", "vocab_path"):
            value = place.get(key)
            if isinstance(value, str) and value:
                path = Path(value)
                if not path.is_absolute():
                    path = Path(examples_dir) / path
                return path if path.is_dir() else path.parent
    for name in ("vocab", "tokenizer"):  # a copy kept beside the shards
        if (Path(examples_dir) / name).is_dir():
            return Path(examples_dir) / name
    return None
