"""Example shards for training: memory-mapped Arrow access, per-rank batches, collation and masking.

The data position of a run is ``(epoch, cursor)``: ``cursor`` counts the samples of the epoch's order
that global batches have consumed. Which examples a rank trains on is a pure function of
``(seed, epoch, cursor, rank, world size, batch sizes)``, so a resumed run continues with exactly the next
batch, and dynamic masking is seeded by ``(seed, epoch, example index)``, so an example is masked the
same way whatever rank or batch it lands in. A global batch and its cut into micro batches depend on the
global and micro batch sizes only, never on the world size: a run resumed on another number of ranks
(accumulation adjusted) averages the gradients of the same micro batches.

``Prefetcher`` collates the next batches on a background thread while the step runs; the position moves
only past the batches steps took, so a checkpoint never skips what was collated ahead.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import os
import queue
import threading
from collections.abc import Callable, Sequence
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
        self._starts_array = np.asarray(starts, dtype=np.int64)

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

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at ``indices`` as flat columns, in that order: per list column NAME its values one
        example after another (the shards' dtype) and ``NAME.offsets`` (int64, one more than the examples, as
        Arrow's lists), and ``next_sentence_label``. Vectorised per record batch, no loop over examples."""
        indices = np.asarray(indices, dtype=np.int64)
        n = len(indices)
        if n and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"example {bad} out of range (0..{len(self) - 1})")
        batch_of = np.searchsorted(self._starts_array, indices, side="right") - 1
        rows = indices - self._starts_array[batch_of]
        groups = [(int(b), np.flatnonzero(batch_of == b)) for b in np.unique(batch_of)]
        taken: dict[str, np.ndarray] = {}
        for name in self._list_columns:
            first = np.zeros(n, dtype=np.int64)  # where each example's values start in its record batch
            lengths = np.zeros(n, dtype=np.int64)
            for b, where in groups:
                offsets = self._batches[b][name + ".offsets"]
                first[where] = offsets[rows[where]]
                lengths[where] = offsets[rows[where] + 1] - first[where]
            out_offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=out_offsets[1:])
            values = np.empty(int(out_offsets[-1]), dtype=self._batches[0][name].dtype)
            for b, where in groups:
                counts = lengths[where]
                within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
                    np.cumsum(counts) - counts, counts
                )
                source = np.repeat(first[where], counts) + within
                values[np.repeat(out_offsets[where], counts) + within] = self._batches[b][name][source]
            taken[name], taken[name + ".offsets"] = values, out_offsets
        labels = np.zeros(n, dtype=np.int64)
        for b, where in groups:
            labels[where] = self._batches[b]["next_sentence_label"][rows[where]]
        taken["next_sentence_label"] = labels
        return taken

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

    def batch_at(self, position: DataPosition) -> tuple[int, list[np.ndarray], DataPosition]:
        """(epoch, this rank's micro batches of global indices, the position after it) of the global batch
        that starts at ``position``; does not advance."""
        if position.cursor + self.global_batch_size > len(self.dataset):
            position = DataPosition(position.epoch + 1, 0)
        epoch, cursor = position.epoch, position.cursor
        global_indices = self._epoch_order(epoch)[cursor : cursor + self.global_batch_size]
        micro = rank_micro_batches(
            global_indices, self.rank, self.world_size, self.micro_batch_size, self.accumulation_steps
        )
        return epoch, micro, DataPosition(epoch, cursor + self.global_batch_size)

    def next(self) -> tuple[int, list[np.ndarray]]:
        """(epoch, this rank's micro batches of global indices) of the next global batch; advances."""
        epoch, micro, self.position = self.batch_at(self.position)
        return epoch, micro


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
    """Turns examples into a padded batch of tensors; masks dynamically when the shards are unmasked.

    Vectorised over the batch: only the per-example random draws loop over examples (each example draws
    from its own generator, seeded by ``(seed, epoch, index)``, so it is masked as ``dynamic_mask`` masks it
    alone). Checks the values the embedding tables take, once per batch on the host, so the model need not
    wait for the device to check them.
    """

    def __init__(
        self,
        metadata: ExampleMetadata,
        seed: int,
        pad_to_multiple_of: int = 8,
        tokens: list[str] | None = None,
        type_vocab_size: int = 2,
    ):
        if metadata.masking not in ("static", "dynamic"):
            raise ValueError(f"unknown masking mode {metadata.masking!r} in the examples' metadata")
        self.metadata = metadata
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.type_vocab_size = type_vocab_size
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

    def __call__(
        self, dataset: ExampleShards | Sequence[dict], indices: np.ndarray, epoch: int
    ) -> dict[str, torch.Tensor]:
        """The padded batch of the examples at ``indices``; dynamic masking is seeded by ``(seed, epoch, index)``."""
        indices = np.asarray(indices, dtype=np.int64)
        flat = take_examples(dataset, indices)
        offsets = flat["input_ids.offsets"]
        ids = flat["input_ids"].astype(np.int64)  # a copy: dynamic masking writes into it
        token_types = flat["token_type_ids"]
        self._check(ids, offsets, token_types, flat["token_type_ids.offsets"])
        row, column = masking.rows_and_positions(offsets)
        if self.dynamic:
            predicted, originals = self._mask(ids, offsets, row, flat, indices, epoch)
            label_row, label_column = row[predicted], column[predicted]
        else:
            label_row, label_column, originals = self._static_labels(flat, offsets)
        n, m = len(indices), self.pad_to_multiple_of
        longest = int(np.diff(offsets).max())
        length = (longest + m - 1) // m * m
        input_ids = np.full((n, length), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((n, length), dtype=np.int64)
        attention_mask = np.zeros((n, length), dtype=np.int64)
        labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
        input_ids[row, column] = ids
        token_type_ids[row, column] = token_types
        attention_mask[row, column] = 1
        labels[label_row, label_column] = originals
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(flat["next_sentence_label"]),
        }

    def _check(
        self, ids: np.ndarray, offsets: np.ndarray, token_types: np.ndarray, type_offsets: np.ndarray
    ) -> None:
        """ValueError for values the model's embedding tables cannot take (one min/max per column)."""
        if len(offsets) < 2:
            raise ValueError("an empty batch: give the collator at least one example index")
        vocab_size = self.metadata.vocab_size
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"token ids must be in [0, vocab_size={vocab_size}), got min {ids.min()} max {ids.max()}: "
                "the shards are corrupt or their metadata names another vocabulary; regenerate the examples"
            )
        if not np.array_equal(offsets, type_offsets):
            raise ValueError(
                "token_type_ids and input_ids differ in length in some example: regenerate the examples"
            )
        if len(token_types) and (token_types.min() < 0 or token_types.max() >= self.type_vocab_size):
            raise ValueError(
                f"token_type_ids must be in [0, type_vocab_size={self.type_vocab_size}), got min "
                f"{token_types.min()} max {token_types.max()}: regenerate the examples or widen the model's type_vocab_size"
            )

    def _static_labels(
        self, flat: dict[str, np.ndarray], offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, original id) of every prediction the shards recorded (static masking)."""
        position_offsets = flat["masked_lm_positions.offsets"]
        columns = flat["masked_lm_positions"].astype(np.int64)
        originals = flat["masked_lm_ids"].astype(np.int64)
        if not np.array_equal(position_offsets, flat["masked_lm_ids.offsets"]):
            raise ValueError(
                "masked_lm_positions and masked_lm_ids differ in length in some example: regenerate the examples"
            )
        rows, _ = masking.rows_and_positions(position_offsets)
        lengths = np.diff(offsets)
        if len(columns) and ((columns < 0).any() or (columns >= lengths[rows]).any()):
            raise ValueError("masked_lm_positions point outside their example: regenerate the examples")
        if len(originals) and (originals.min() < 0 or originals.max() >= self.metadata.vocab_size):
            raise ValueError(
                f"masked_lm_ids must be in [0, vocab_size={self.metadata.vocab_size}): regenerate the examples"
            )
        return rows, columns, originals

    def _mask(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        row: np.ndarray,
        flat: dict[str, np.ndarray],
        indices: np.ndarray,
        epoch: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dynamic masking of a flat batch, in place: (flat positions predicted, ascending; their original ids).

        Each example's generator makes the draws ``dynamic_mask`` would make for it alone, in the same order
        (selection, then 80/10/10); the selection itself runs once over the batch.
        """
        n = len(indices)
        candidate = ~np.isin(ids, self.never_predicted)
        word_start = self._word_starts(ids, offsets, candidate, flat)
        rngs = [np.random.default_rng([self.seed, epoch, int(i)]) for i in indices]
        lengths = np.diff(offsets)
        if word_start is None:  # data_prep.masking draws one 64-bit key per token of the example
            keys = np.zeros((n, int(lengths.max())), dtype=np.uint64)
            for r, (rng, k) in enumerate(zip(rngs, lengths.tolist(), strict=True)):
                keys[r, :k] = rng.bit_generator.random_raw(k)
            draws = _PresetDraws(raw=keys)
        else:  # one uniform per word that holds a candidate
            word_of_token = np.cumsum(word_start) - 1
            size = np.bincount(word_of_token, weights=candidate)
            word_row = row[np.flatnonzero(word_start)][size > 0]
            per_row = np.bincount(word_row, minlength=n).tolist()
            uniform = [rng.random(k) for rng, k in zip(rngs, per_row, strict=True)]
            draws = _PresetDraws(uniform=np.concatenate(uniform))
        predicted, _ = masking.choose_predictions(
            ids, offsets, candidate, self.metadata.masked_lm_prob, self.metadata.max_predictions_per_seq,
            draws, word_start,
        )  # fmt: skip
        # 80/10/10 as masking.replace_80_10_10, each example continuing its own generator
        per_row = np.bincount(row[predicted], minlength=n).tolist()
        draw = np.concatenate([rng.random(k) for rng, k in zip(rngs, per_row, strict=True)])
        to_mask, to_random = draw < 0.8, draw >= 0.9
        random_per_row = np.bincount(row[predicted[to_random]], minlength=n).tolist()
        # the last draw of each example: one that would draw nothing can be left out (a call costs ~10 µs)
        choice = [
            rng.integers(0, len(self.replacement_ids), k)
            for rng, k in zip(rngs, random_per_row, strict=True)
            if k
        ]
        choice.append(np.zeros(0, dtype=np.int64))  # np.concatenate needs one array at least
        originals = ids[predicted]
        ids[predicted[to_mask]] = self.mask_id
        ids[predicted[to_random]] = self.replacement_ids[np.concatenate(choice).astype(np.int64)]
        return predicted, originals

    def _word_starts(
        self, ids: np.ndarray, offsets: np.ndarray, candidate: np.ndarray, flat: dict[str, np.ndarray]
    ) -> np.ndarray | None:
        """Where the words of whole-word masking begin over the flat batch: the shards' ``word_start`` column
        (written by the examples stage for dynamic whole-word masking), else "##" pieces grouped by the
        vocabulary; None without whole-word masking."""
        if not self.whole_word:
            return None
        if WORD_START_COLUMN in flat:
            if not np.array_equal(flat[WORD_START_COLUMN + ".offsets"], offsets):
                raise ValueError(
                    f"{WORD_START_COLUMN} and input_ids differ in length in some example: regenerate the examples"
                )
            word_start = flat[WORD_START_COLUMN].astype(bool)
            word_start[offsets[:-1]] = True  # every example starts a word
            return word_start
        if self.metadata.word_segmenter is not None:
            raise ValueError(
                f"the examples were segmented into words by {self.metadata.word_segmenter} but these examples "
                f"lack their {WORD_START_COLUMN!r} column: read the shards with a bert.pretrain.data that loads it"
            )
        if self.is_continuation is None:
            raise ValueError("whole-word dynamic masking needs the vocabulary's tokens")
        return masking.word_starts(ids, offsets, candidate, self.is_continuation)


def take_examples(dataset: ExampleShards | Sequence[dict], indices: np.ndarray) -> dict[str, np.ndarray]:
    """The flat columns of ``ExampleShards.take``; from any other sequence of example dicts (what
    ``ExampleShards[i]`` returns) built example by example."""
    if isinstance(dataset, ExampleShards):
        return dataset.take(indices)
    examples = [dataset[int(i)] for i in indices]
    if not examples:
        raise ValueError("an empty batch: give the collator at least one example index")
    taken: dict[str, np.ndarray] = {}
    for name in (*LIST_COLUMNS, *OPTIONAL_LIST_COLUMNS):
        if name in examples[0]:
            values = [np.asarray(e[name]) for e in examples]
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum([len(v) for v in values], out=offsets[1:])
            taken[name], taken[name + ".offsets"] = np.concatenate(values), offsets
    taken["next_sentence_label"] = np.array([e["next_sentence_label"] for e in examples], dtype=np.int64)
    return taken


class _PresetDraws:
    """The generator ``masking.choose_predictions`` draws from over a whole batch, serving the draws each
    example's own generator made beforehand, so that the batch is masked as each example alone would be."""

    def __init__(self, raw: np.ndarray | None = None, uniform: np.ndarray | None = None):
        self.bit_generator = self  # masking draws its keys from ``rng.bit_generator.random_raw``
        self._raw, self._uniform = raw, uniform

    def random_raw(self, size: tuple[int, ...]) -> np.ndarray:
        return self._serve(self._raw, size)

    def random(self, size: int) -> np.ndarray:
        return self._serve(self._uniform, size)

    @staticmethod
    def _serve(values: np.ndarray | None, size) -> np.ndarray:
        shape = tuple(size) if isinstance(size, tuple) else (int(size),)
        if values is None or values.shape != shape:
            # masking changed what it draws: the per-example draws above must follow, or batches change
            raise RuntimeError(
                f"data_prep.masking asked for {shape} random numbers, the collator prepared "
                f"{None if values is None else values.shape}: update Collator._mask to match it"
            )
        return values


# --- collating ahead of the step ------------------------------------------------------------------------


@dataclass
class PreparedBatch:
    """One global batch collated ahead: this rank's micro batches and the data position after it."""

    epoch: int
    indices: list[np.ndarray]
    micro_batches: list[dict[str, torch.Tensor]]
    position: DataPosition


class Prefetcher:
    """Collates the next global batches of a ``RankBatches`` on a background thread, up to ``depth`` ahead.

    The batches are those ``batches.next()`` would give, in that order. ``next`` moves ``batches.position``
    past the batch it returns, never further: a checkpoint saves the position of what steps consumed, not of
    what waits in the queue. With ``pin_memory`` (default: when CUDA is available) the tensors are in page-locked
    memory, so their copies to the GPU (``non_blocking=True``) do not block the host.
    """

    def __init__(
        self,
        batches: RankBatches,
        collate: Callable[[np.ndarray, int], dict[str, torch.Tensor]],
        depth: int = 4,
        pin_memory: bool | None = None,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth {depth}: give at least 1 batch")
        self.batches = batches
        self.collate = collate
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # the rank's GPU: a new thread's current device is GPU 0, where pinning would open a CUDA context
        self._device = torch.cuda.current_device() if self.pin_memory else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # the thread reads its own copy: the order cache of ``batches`` is then touched by one thread only
        self._source = copy.copy(batches)
        self._thread = threading.Thread(
            target=self._produce, args=(batches.position,), name="bertpipe-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, position: DataPosition) -> None:
        try:
            if self._device is not None:
                torch.cuda.set_device(self._device)
            while not self._stop.is_set():
                epoch, micro, position = self._source.batch_at(position)
                micro_batches = [self.collate(indices, epoch) for indices in micro]
                if self.pin_memory:
                    micro_batches = [
                        {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()}
                        for b in micro_batches
                    ]
                self._put(PreparedBatch(epoch, micro, micro_batches, position))
        except BaseException as e:  # handed to the consumer, which raises it in the training loop
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # wakes now and then to see whether it was closed
                return
            except queue.Full:
                continue

    def next(self) -> PreparedBatch:
        """The next global batch (waits while it is being collated); advances ``batches.position`` past it."""
        if self._stop.is_set():
            raise RuntimeError("the prefetcher was closed")
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.batches.position = item.position
        return item

    def close(self) -> None:
        """Stop the thread and drop what it collated ahead (the position stays at what was consumed)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
