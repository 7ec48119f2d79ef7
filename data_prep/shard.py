"""The shard stage: raw text/JSONL/Parquet/HF datasets → sentence-split documents in N Parquet shards.

Two passes, both with bounded memory and both resumable after a kill:

1. *read* (parallel over groups of input files): documents are decoded, split into paragraphs and
   sentences (sentencex), hashed, and appended to a per-shard spill file (``DIR/.spill/task-*/``). A
   document's shard and split are a pure function of its content hash and the seed, so duplicates meet
   in one shard and the output does not depend on ``--workers`` or on file order.
   With near-duplicate removal on, each task also writes every document's MinHash signature
   (``data_prep.neardup``); between the passes one global LSH pass over the signatures only (never the
   text; on disk, one band at a time, so its memory does not grow with the corpus) picks the near-duplicates
   to drop, the survivor of each being the smallest content hash, and lists them in ``near_duplicates.jsonl``.
2. *write* (parallel over shards): each shard's spill is sorted by content hash (hence by ``doc_id``),
   exact duplicates and the chosen near-duplicates are dropped (of exact copies, the one with the smallest
   ``source`` is kept), and the rows go to
   ``DIR/train/part-NNNNN.parquet`` and ``DIR/valid/part-NNNNN.parquet``, each written atomically.

Every finished task and shard leaves a small JSON marker, so a re-run of a killed stage (same
fingerprint) continues where it stopped. The input fingerprint hashes each input file's path, size and
mtime (a saved dataset: all of its files; ``hf://`` inputs: the spec string only, since the hub revision
cannot be known offline) — content edited in place with size and mtime preserved is not noticed.

Documents of fewer than two sentences are kept (as Google's generator does: they still serve as random
"next" segments) and counted as ``short_documents``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import neardup
from data_prep.cjk import CJK_WORD_CHARS_RE2, HAS_ALNUM_RE2
from data_prep.languages import check_language
from data_prep.manifest import (
    StageError,
    atomic_path,
    begin_stage,
    file_entry,
    fingerprint,
    read_json,
    read_manifest,
    stage_fingerprint,
    write_json_atomic,
)
from data_prep.parallel import Mapper, local_mapper
from data_prep.schema import CORPUS_SCHEMA
from data_prep.sentences import split_sentences
from data_prep.textio import InputUnit, discover_inputs, iter_unit_documents

log = logging.getLogger(__name__)

STAGE = "shard"
FORMAT_VERSION = 2  # 2: CJK line joins and sentence ends (data_prep.cjk)
DOC_BOUNDARIES = ("blank-line", "file")
SPLITS = ("train", "valid")
SPILL_DIR = ".spill"
SPILL_SCHEMA = pa.schema(
    [("digest", pa.binary()), ("source", pa.string()), ("sentences", pa.list_(pa.string()))]
)
SIGNATURE_SCHEMA = pa.schema(
    [
        ("digest", pa.binary(16)),
        ("source", pa.string()),
        ("signature", pa.list_(pa.uint32(), neardup.NUM_PERM)),
    ]
)
SIGNATURES = "signatures.arrow"  # per read task, beside its shard spills: every document's MinHash signature
NEAR_DUPLICATES = "near_duplicates.jsonl"  # the stage's list of near-duplicates dropped, one JSON per line
NEAR_DUPLICATE_DROPS = "near-dup-{shard:05d}.bin"  # in the spill: digests (16 bytes each) pass 2 drops
SPILL_FLUSH_CHARS = 16 << 20  # a reading task buffers at most ~16 M characters before writing its spill
TASK_MIN_BYTES, TASK_MAX_BYTES = 1 << 20, 256 << 20
ROW_GROUP_DOCUMENTS = 1024  # at most this many documents per Parquet row group ...
ROW_GROUP_BYTES = 16 << 20  # ... and at most ~16 MB of sentence text (a one-document group may exceed it)
WRITE_RANGE_BYTES = 16 << 20  # a shard write sorts ~this much spill at a time (a worker's peak: ~+150 MB) ...
WRITE_MAX_RANGES = 256  # ... in at most this many ranges (open files): a shard over ~4 GB of spill sorts more


@dataclass
class ShardConfig:
    """How to turn raw inputs into corpus shards."""

    inputs: list[str]
    """Files, directories (searched recursively), saved HF datasets, or ``hf://NAME[:CONFIG][@SPLIT]``."""
    out: str
    """The stage directory to write."""
    num_shards: int
    """Parquet files per split; each shard's documents must fit in memory while it is written."""
    doc_boundary: str = "blank-line"
    """Plain text only: ``blank-line`` (a blank line ends a document) or ``file`` (a file is a document)."""
    valid_fraction: float = 0.01
    """Share of documents (by content hash) put in the valid split."""
    seed: int = 0
    """Mixed into the hash that places documents in shards and splits."""
    workers: int = 1
    """Processes for reading and writing; the output is identical for any value."""
    text_field: str = "text"
    """The field/column holding the text in JSONL, Parquet and HF dataset inputs."""
    language: str = "en"
    """Language code for sentencex's sentence splitter: one it knows (``data_prep.languages``), any case."""
    near_dup_threshold: float = 0.8
    """Drop a document whose estimated Jaccard similarity (5-word/5-CJK-character shingles, MinHash) with a
    kept document reaches this; 0 turns near-duplicate removal off (exact duplicates are always dropped)."""
    max_sentence_chars: int = 2_000
    """Longer "sentences" (unbalanced quotes, run-on lines) are re-split at punctuation, then on spaces.

    2,000 characters is about 450 WordPiece tokens: a longer segment would be truncated by the examples
    stage anyway, so cutting it keeps its text in the corpus."""
    force: bool = field(default=False, repr=False)
    """Rebuild even when a finished stage with the same fingerprint exists."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.inputs = [str(p) for p in self.inputs]
        self.out = str(self.out)
        if not self.inputs:
            raise ValueError("no inputs: give at least one --input file, directory or hf:// dataset")
        if self.num_shards < 1:
            raise ValueError(
                f"num_shards must be at least 1, got {self.num_shards}: pass --num-shards 1 or more"
            )
        if self.doc_boundary not in DOC_BOUNDARIES:
            raise ValueError(
                f"doc_boundary must be one of {', '.join(DOC_BOUNDARIES)}, got {self.doc_boundary!r}"
            )
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(
                f"valid_fraction must be in [0, 1), got {self.valid_fraction}: e.g. --valid-fraction 0.01"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if not self.text_field:
            raise ValueError("text_field must name a field or column, e.g. --text-field text")
        self.language = check_language(self.language)  # one sentencex knows, in its (lower) case
        if not 0.0 <= self.near_dup_threshold <= 1.0:
            raise ValueError(
                f"near_dup_threshold must be in [0, 1], got {self.near_dup_threshold}: e.g. "
                "--near-dup-threshold 0.8, or 0 (--no-near-dup) to keep near-duplicates"
            )
        if self.max_sentence_chars < 16:
            raise ValueError(f"max_sentence_chars must be at least 16, got {self.max_sentence_chars}")

    def output_config(self) -> dict:
        """The settings that decide the output (not workers, out or force): the stage fingerprint's config."""
        values = asdict(self)
        for key in ("out", "workers", "force"):
            values.pop(key)
        if self.near_dup_threshold > 0:  # a new library or shingling changes which documents survive
            values["near_dup_method"] = neardup.method()
        return values


# --- documents: sentences, hashes, placement -------------------------------------------------------------


def content_digest(sentences: list[str]) -> bytes:
    """128 bits of sha256 over the normalised document (sentences joined by newlines)."""
    return hashlib.sha256("\n".join(sentences).encode("utf-8")).digest()[:16]


def doc_id_of(digest: bytes) -> int:
    """A stable non-negative int64 id: the digest's first 63 bits (so sorting by digest sorts by id)."""
    return int.from_bytes(digest[:8], "big") >> 1


def placement(digest: bytes, seed: int, num_shards: int, valid_fraction: float) -> tuple[int, bool]:
    """(shard index, is_valid) of a document: a pure function of its content hash and the seed."""
    mixed = hashlib.sha256(seed.to_bytes(8, "big", signed=True) + digest).digest()
    shard = int.from_bytes(mixed[:8], "big") % num_shards
    is_valid = int.from_bytes(mixed[8:16], "big") < valid_fraction * 2**64
    return shard, is_valid


# --- pass 1: read inputs into per-shard spill files --------------------------------------------------------


def group_units(units: list[InputUnit]) -> list[list[InputUnit]]:
    """Consecutive input units batched into tasks of about total/256 bytes (1–256 MiB).

    The grouping depends on the inputs only (not on --workers), so a re-run can reuse finished tasks.
    """
    total = sum(u.size for u in units)
    target = min(TASK_MAX_BYTES, max(TASK_MIN_BYTES, total // 256))
    groups: list[list[InputUnit]] = []
    current: list[InputUnit] = []
    current_bytes = 0
    for unit in units:
        if current and (current_bytes + unit.size > target or unit.kind == "hf_hub"):
            groups.append(current)
            current, current_bytes = [], 0
        current.append(unit)
        current_bytes += unit.size
    if current:
        groups.append(current)
    return groups


class _SpillWriter:
    """Appends documents to one Arrow stream file per shard, flushing when the buffer grows."""

    def __init__(self, directory: Path, num_shards: int, sign: bool = False) -> None:
        self.directory = directory
        self.buffers: list[list[tuple[bytes, str, list[str]]]] = [[] for _ in range(num_shards)]
        self.writers: dict[int, pa.RecordBatchStreamWriter] = {}
        self.buffered_chars = 0
        self.signatures: pa.RecordBatchStreamWriter | None = None
        self.sign = sign  # also write every document's MinHash signature to SIGNATURES

    def add(self, shard: int, digest: bytes, source: str, sentences: list[str]) -> None:
        self.buffers[shard].append((digest, source, sentences))
        self.buffered_chars += sum(map(len, sentences))
        if self.buffered_chars > SPILL_FLUSH_CHARS:
            self.flush()

    def flush(self) -> None:
        if self.sign:
            self._write_signatures([row for rows in self.buffers for row in rows])
        for shard, rows in enumerate(self.buffers):
            if not rows:
                continue
            if shard not in self.writers:
                sink = pa.OSFile(str(self.directory / f"shard-{shard:05d}.arrow"), "wb")
                self.writers[shard] = pa.ipc.new_stream(sink, SPILL_SCHEMA)
            digests, sources, sentences = zip(*rows, strict=True)
            self.writers[shard].write_batch(
                pa.record_batch([list(digests), list(sources), list(sentences)], schema=SPILL_SCHEMA)
            )
            rows.clear()
        self.buffered_chars = 0

    def _write_signatures(self, rows: list[tuple[bytes, str, list[str]]]) -> None:
        signatures, signed = neardup.signatures([sentences for _, _, sentences in rows])
        if not len(signed):
            return
        if self.signatures is None:
            sink = pa.OSFile(str(self.directory / SIGNATURES), "wb")
            self.signatures = pa.ipc.new_stream(sink, SIGNATURE_SCHEMA)
        values = pa.array(signatures.reshape(-1), pa.uint32())
        columns = [
            [rows[i][0] for i in signed],
            [rows[i][1] for i in signed],
            pa.FixedSizeListArray.from_arrays(values, neardup.NUM_PERM),
        ]
        self.signatures.write_batch(pa.record_batch(columns, schema=SIGNATURE_SCHEMA))

    def close(self) -> None:
        self.flush()
        for writer in (*self.writers.values(), *filter(None, [self.signatures])):
            writer.close()


def _read_unit(unit: InputUnit, config: ShardConfig, spill: _SpillWriter, stats: Counter) -> None:
    for source, paragraphs in iter_unit_documents(unit, config.doc_boundary, config.text_field, stats):
        sentences = [
            s
            for paragraph in paragraphs
            for s in split_sentences(paragraph, config.language, config.max_sentence_chars, stats)
        ]
        if not sentences:
            stats["dropped_empty"] += 1
            continue
        stats["documents_read"] += 1
        digest = content_digest(sentences)
        shard, _ = placement(digest, config.seed, config.num_shards, config.valid_fraction)
        spill.add(shard, digest, source, sentences)


def read_task(task_index: int, units: list[InputUnit], config: ShardConfig, spill_root: str) -> dict:
    """Pass 1 for one group of inputs: documents into spill files; returns (and records) its stats."""
    spill_root = Path(spill_root)
    final = spill_root / f"task-{task_index:05d}"
    partial = spill_root / f"task-{task_index:05d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    partial.mkdir(parents=True)
    stats: Counter = Counter()
    spill = _SpillWriter(partial, config.num_shards, sign=config.near_dup_threshold > 0)
    for unit in units:
        stats["input_units"] += 1
        stats["input_bytes"] += unit.size
        try:
            _read_unit(unit, config, spill, stats)
        except (OSError, EOFError, zlib.error, pa.ArrowInvalid) as e:
            # a truncated .gz or corrupt Parquet file: keep the documents read before the damage
            log.warning(
                "stopped reading %s at a damaged spot (%s); its earlier documents are kept", unit.location, e
            )
            stats["unreadable_files"] += 1
    spill.close()
    partial.rename(final)
    result = dict(stats)
    write_json_atomic(spill_root / f"task-{task_index:05d}.json", result)
    return result


# --- pass 2: one shard's spill → sorted, deduplicated Parquet parts ----------------------------------------


def _split_stats(table: pa.Table) -> dict:
    """Counts of one part. ``words`` as ``data_prep.cjk.count_words``: every ideograph or kana character, and
    every whitespace-separated run of other text holding a letter or digit; ``cjk_characters`` the former."""
    flat = pc.list_flatten(table.column("sentences"))
    num_cjk = int(pc.sum(pc.count_substring_regex(flat, CJK_WORD_CHARS_RE2)).as_py() or 0)
    rest = pc.replace_substring_regex(flat, CJK_WORD_CHARS_RE2, " ") if num_cjk else flat
    runs = pc.list_flatten(pc.utf8_split_whitespace(rest))
    return {
        "documents": table.num_rows,
        "sentences": len(flat),
        "words": num_cjk + int(pc.sum(pc.match_substring_regex(runs, HAS_ALNUM_RE2)).as_py() or 0),
        "cjk_characters": num_cjk,
        "bytes": int(pc.sum(pc.binary_length(flat)).as_py() or 0),
    }


def row_group_bounds(table: pa.Table, max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive row ranges ``(start, stop)`` of at most ``max_rows`` documents and ``max_bytes`` bytes of
    sentence text each (a single document bigger than that is a group of its own).

    A function of the rows only, so the files do not depend on --workers, and a reader that loads a row
    group at a time holds a bounded amount whatever the size of the shard or of its books.
    """
    sentences = table.column("sentences")
    num_rows = table.num_rows
    lengths = pc.fill_null(pc.list_value_length(sentences), 0).to_numpy(zero_copy_only=False)
    flat_bytes = pc.binary_length(pc.list_flatten(sentences)).to_numpy(zero_copy_only=False)
    text = np.zeros(len(flat_bytes) + 1, dtype=np.int64)
    np.cumsum(flat_bytes, out=text[1:])
    row_end = text[np.cumsum(lengths.astype(np.int64))]  # bytes of text up to the end of each row
    bounds, start = [], 0
    while start < num_rows:
        before = row_end[start - 1] if start else 0
        stop = int(np.searchsorted(row_end, before + max_bytes, side="right"))
        stop = min(max(stop, start + 1), start + max_rows, num_rows)
        bounds.append((start, stop))
        start = stop
    return bounds


def part_path(split: str, shard: int) -> str:
    """A part file's path inside the stage directory, e.g. ``train/part-00003.parquet``."""
    return f"{split}/part-{shard:05d}.parquet"


def _read_stream(path: Path, columns: list[str] | None = None) -> pa.Table:
    with pa.OSFile(str(path), "rb") as source:
        table = pa.ipc.open_stream(source).read_all()
    return table if columns is None else table.select(columns)


def _stream_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow stream file, one at a time."""
    with pa.OSFile(str(path), "rb") as source:
        yield from pa.ipc.open_stream(source)


def _digest_prefixes(digests: pa.Array) -> np.ndarray:
    """The first 4 bytes of each 16-byte digest, big-endian, as uint64: ordered as the digests are."""
    offsets = np.frombuffer(digests.buffers()[1], np.int32)[digests.offset : digests.offset + len(digests)]
    data = np.frombuffer(digests.buffers()[2], np.uint8)
    head = data[offsets[:, None] + np.arange(4)].astype(np.uint64)
    return (head[:, 0] << 24) | (head[:, 1] << 16) | (head[:, 2] << 8) | head[:, 3]


def _digest_ranges(spills: list[Path], work_dir: Path) -> Iterator[pa.Table]:
    """A shard's spilled rows as tables of consecutive digest ranges, lowest first, each holding every row of
    its range (so every copy of a document) and about ``WRITE_RANGE_BYTES`` of spill.

    The spill is cut by the digest's first 32 bits into files in ``work_dir`` (one batch in memory at a
    time), then read back a range at a time: a shard's memory is bounded by the range, not the shard.
    """
    size = sum(p.stat().st_size for p in spills)
    num_ranges = min(max(1, -(-size // WRITE_RANGE_BYTES)), WRITE_MAX_RANGES)
    if num_ranges == 1:  # small enough to sort at once: no second copy on disk
        tables = [_read_stream(spill) for spill in spills]
        yield pa.concat_tables(tables) if tables else SPILL_SCHEMA.empty_table()
        return
    shutil.rmtree(work_dir, ignore_errors=True)  # left by a killed run
    work_dir.mkdir(parents=True)
    paths = [work_dir / f"range-{r:05d}.arrow" for r in range(num_ranges)]
    try:
        with contextlib.ExitStack() as stack:
            writers: dict[int, pa.RecordBatchStreamWriter] = {}
            for spill in spills:
                for batch in _stream_batches(spill):
                    # monotonic in the digest: range r holds prefixes in [r, r + 1) * 2^32 / num_ranges
                    ranges = (_digest_prefixes(batch.column("digest")) * np.uint64(num_ranges)) >> np.uint64(
                        32
                    )
                    order = np.argsort(ranges, kind="stable")
                    bounds = np.searchsorted(ranges[order], np.arange(num_ranges + 1))
                    batch = batch.take(pa.array(order))
                    for r in np.flatnonzero(np.diff(bounds)).tolist():
                        if r not in writers:
                            sink = stack.enter_context(pa.OSFile(str(paths[r]), "wb"))
                            writers[r] = stack.enter_context(pa.ipc.new_stream(sink, SPILL_SCHEMA))
                        writers[r].write_batch(batch.slice(bounds[r], bounds[r + 1] - bounds[r]))
        for path in paths:
            if path.exists():
                table = _read_stream(path)
                path.unlink()
                yield table
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


class _PartWriter:
    """One part file written as rows arrive in digest order, cut into exactly the row groups that
    ``row_group_bounds`` gives for the whole part: every group but the last is final once its rows are in."""

    def __init__(self, path: Path) -> None:
        self.writer = pq.ParquetWriter(path, CORPUS_SCHEMA, compression="zstd")
        self.pending = CORPUS_SCHEMA.empty_table()  # the rows of the last, still open, row group
        self.written = 0
        self.stats = _split_stats(self.pending)
        self.stats["short_documents"] = 0

    def add(self, rows: pa.Table) -> None:
        """Append ``rows`` (the next in the part's order) and write the row groups they complete."""
        if not rows.num_rows:
            return
        for key, value in _split_stats(rows).items():
            self.stats[key] += value
        self.stats["short_documents"] += _short_documents(rows)
        self._write(pa.concat_tables([self.pending, rows]), final=False)

    def _write(self, rows: pa.Table, final: bool) -> None:
        groups = row_group_bounds(rows, ROW_GROUP_DOCUMENTS, ROW_GROUP_BYTES)
        if not final:
            groups = groups[:-1]  # more rows may still join the last group
        for start, stop in groups:
            self.writer.write_table(
                rows.slice(start, stop - start).combine_chunks(), row_group_size=stop - start
            )
        done = groups[-1][1] if groups else 0
        self.written += done
        self.pending = rows.slice(done).combine_chunks()  # a copy: the range it came from can be freed

    def close(self) -> dict:
        """Write the last row group (an empty part: one empty row group) and close; the part's stats."""
        self._write(self.pending, final=True)
        if not self.written:
            self.writer.write_table(self.pending, row_group_size=1)
        self.writer.close()
        return self.stats


def _short_documents(table: pa.Table) -> int:
    return int(pc.sum(pc.less(pc.list_value_length(table.column("sentences")), 2)).as_py() or 0)


def write_shard(stage_dir: str, shard: int, config: ShardConfig) -> dict:
    """Pass 2 for one shard: sort by content hash, drop exact duplicates and the near-duplicates the global
    pass chose, split, write both parts.

    The shard is sorted a digest range at a time (``_digest_ranges``) and its parts written as it goes, so a
    worker holds ~``WRITE_RANGE_BYTES`` of spill and its copies, however large the shard (up to
    ``WRITE_MAX_RANGES`` ranges).
    """
    stage_dir = Path(stage_dir)
    spill_root = stage_dir / SPILL_DIR
    spills = sorted(spill_root.glob(f"task-*[0-9]/shard-{shard:05d}.arrow"))
    near_duplicates = set()
    if config.near_dup_threshold > 0:
        drops = (spill_root / NEAR_DUPLICATE_DROPS.format(shard=shard)).read_bytes()
        near_duplicates = {drops[i : i + 16] for i in range(0, len(drops), 16)}
    num_rows = num_kept = 0
    with contextlib.ExitStack() as stack:
        parts = {
            split: _PartWriter(stack.enter_context(atomic_path(stage_dir / part_path(split, shard))))
            for split in SPLITS
        }
        for table in _digest_ranges(spills, spill_root / f"shard-{shard:05d}.ranges"):
            # digest then source: the kept copy of a duplicate does not depend on file order or workers
            table = table.sort_by([("digest", "ascending"), ("source", "ascending")])
            digests = table.column("digest").to_pylist()
            keep = [
                (i == 0 or digests[i] != digests[i - 1]) and digests[i] not in near_duplicates
                for i in range(len(digests))
            ]
            num_rows, num_kept = num_rows + len(keep), num_kept + sum(keep)
            table = table.filter(pa.array(keep, pa.bool_()))
            digests = [d for d, k in zip(digests, keep, strict=True) if k]
            is_valid = [
                placement(d, config.seed, config.num_shards, config.valid_fraction)[1] for d in digests
            ]
            corpus = pa.table(
                [
                    pa.array([doc_id_of(d) for d in digests], pa.int64()),
                    table.column("source"),
                    table.column("sentences"),
                ],
                schema=CORPUS_SCHEMA,
            )
            valid_mask = pa.array(is_valid, pa.bool_())
            parts["train"].add(corpus.filter(pc.invert(valid_mask)))
            parts["valid"].add(corpus.filter(valid_mask))
            del table, corpus  # the next range is read while these would still be held
        result = {
            "duplicates": num_rows - num_kept - len(near_duplicates),
            "near_duplicates": len(near_duplicates),
        }
        for split, part in parts.items():
            result[split] = part.close()
    write_json_atomic(spill_root / f"shard-{shard:05d}.json", result)
    return result


# --- the stage ---------------------------------------------------------------------------------------------


def _local_mapper(workers: int) -> contextlib.AbstractContextManager[Mapper]:
    """One pool for both passes (inline for one worker).

    forkserver, not fork: the parent may hold pyarrow/tokenizers threads, which fork would copy mid-lock.
    The server imports the entry point and this module once; each worker is a cheap fork of it.
    """
    return local_mapper(workers, start_method="forkserver", preload=("__main__", __name__))


def _read_inputs(units: list[InputUnit], config: ShardConfig, spill_root: Path, map_jobs: Mapper) -> Counter:
    """Pass 1 over the input tasks not finished by an earlier run; the summed reading stats."""
    tasks = group_units(units)
    task_stats = {i: read_json(spill_root / f"task-{i:05d}.json") for i in range(len(tasks))}
    pending = [(i, tasks[i], config, str(spill_root)) for i, s in task_stats.items() if s is None]
    if len(pending) < len(tasks):
        log.info("shard: resuming, %d of %d read tasks already done", len(tasks) - len(pending), len(tasks))
    results = map_jobs(read_task, pending, "shard: reading")
    for (i, *_), result in zip(pending, results, strict=True):
        task_stats[i] = result
    return sum((Counter(s) for s in task_stats.values()), Counter())


def _write_shards(stage_dir: Path, config: ShardConfig, map_jobs: Mapper) -> list[dict]:
    """Pass 2 over the shards not finished by an earlier run; each shard's stats."""
    shard_stats: dict[int, dict | None] = {}
    for s in range(config.num_shards):
        done = all((stage_dir / part_path(split, s)).exists() for split in SPLITS)
        shard_stats[s] = read_json(stage_dir / SPILL_DIR / f"shard-{s:05d}.json") if done else None
    pending = [(str(stage_dir), s, config) for s, st in shard_stats.items() if st is None]
    for (_, s, _), result in zip(pending, map_jobs(write_shard, pending, "shard: writing"), strict=True):
        shard_stats[s] = result
    return [shard_stats[s] for s in range(config.num_shards)]


NEAR_DUPLICATE_WORK = "near-dup-lsh"  # in the spill: the on-disk LSH pass's files while it runs


def _signature_batches(paths: list[Path]) -> Iterator[pa.RecordBatch]:
    """The record batches of the tasks' signature files, one at a time: a task that read one 10 GB file
    wrote GBs of signatures, but each batch holds one spill flush (~16 M characters of text)."""
    for path in paths:
        with pa.OSFile(str(path), "rb") as source:
            yield from pa.ipc.open_stream(source)


def _digest_words(digests: pa.Array) -> np.ndarray:
    """16-byte digests as ``(n, 2)`` uint64 (high, low word): ordered as the bytes are."""
    words = np.frombuffer(digests.buffers()[1], ">u8").reshape(-1, 2)
    return words[digests.offset : digests.offset + len(digests)].astype(np.uint64)  # the buffer may hold more


def _digests_and_signatures(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(digests ``(n, 2)`` uint64, signatures ``(n, NUM_PERM)`` uint32) of one batch of a signature file."""
    signatures = batch.column("signature").flatten().to_numpy()
    return _digest_words(batch.column("digest")), signatures.reshape(-1, neardup.NUM_PERM)


def _smallest_sources(paths: list[Path], wanted: set[bytes]) -> dict[bytes, str]:
    """{digest: its smallest source} for the ``wanted`` digests: the copy of an exact duplicate that
    write_shard keeps."""
    sources: dict[bytes, str] = {}
    wanted_high = np.array(sorted({int.from_bytes(d[:8], "big") for d in wanted}), np.uint64)
    for batch in _signature_batches(paths):
        batch = batch.take(np.flatnonzero(np.isin(_digest_words(batch.column("digest"))[:, 0], wanted_high)))
        for digest, source in zip(*(batch.column(c).to_pylist() for c in ("digest", "source")), strict=True):
            if digest in wanted and (digest not in sources or source < sources[digest]):
                sources[digest] = source
    return sources


def _drop_near_duplicates(stage_dir: Path, config: ShardConfig) -> int:
    """The global pass between reading and writing: LSH over every document's signature (read tasks wrote
    them beside their spills), ranked by content digest, so the survivor of a group is the document with
    the smallest content digest whatever the shard, task or worker each copy went through. Writes the
    stage's ``near_duplicates.jsonl`` and each shard's list of digests to drop; returns how many.

    Memory does not grow with the corpus (``neardup.find_near_duplicates_on_disk``: one band's keys at a time,
    in parts, signatures read from disk as candidates need them) beyond ~100 bytes per near-duplicate found;
    the signature files are read one batch at a time; never the text. Disk: ~670 bytes per document while it
    runs, in the spill.
    """
    spill_root = stage_dir / SPILL_DIR
    paths = sorted(spill_root.glob(f"task-*[0-9]/{SIGNATURES}"))
    work_dir = spill_root / NEAR_DUPLICATE_WORK
    shutil.rmtree(work_dir, ignore_errors=True)  # left by a killed run
    batches = map(_digests_and_signatures, _signature_batches(paths))
    dropped, kept, similarity = neardup.find_near_duplicates_on_disk(
        batches, config.near_dup_threshold, work_dir
    )
    dropped_digests = [d.astype(">u8").tobytes() for d in dropped]
    kept_digests = [k.astype(">u8").tobytes() for k in kept]
    sources = _smallest_sources(paths, {*dropped_digests, *kept_digests})
    drops: list[list[bytes]] = [[] for _ in range(config.num_shards)]
    with atomic_path(stage_dir / NEAR_DUPLICATES) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for d, k, s in zip(dropped_digests, kept_digests, similarity.tolist(), strict=True):
            record = {
                "doc_id": doc_id_of(d),
                "source": sources[d],
                "duplicate_of": doc_id_of(k),
                "duplicate_of_source": sources[k],
                "similarity": round(s, 4),  # estimated Jaccard: the share of equal signature values
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            shard, _ = placement(d, config.seed, config.num_shards, config.valid_fraction)
            drops[shard].append(d)
    for shard, digests in enumerate(drops):
        with atomic_path(spill_root / NEAR_DUPLICATE_DROPS.format(shard=shard)) as tmp:
            tmp.write_bytes(b"".join(digests))
    return len(dropped)


def _stage_inputs(config: ShardConfig) -> tuple[list[InputUnit], dict[str, str]]:
    """(the input units, the inputs' fingerprint): StageError when the inputs hold no file."""
    units, skipped = discover_inputs(config.inputs)
    if skipped:
        log.info("skipping %d files with unknown suffixes (e.g. %s)", len(skipped), skipped[0])
    if not units:
        raise StageError(
            f"no input files found in {', '.join(config.inputs)}: expected .txt, .jsonl, .json or .parquet "
            "files (text and JSONL also compressed: .gz, .zst, .xz, .bz2) or a saved Hugging Face dataset"
        )
    return units, {"raw": fingerprint([u.fingerprint() for u in units])}


def expected_fingerprint(config: ShardConfig) -> str:
    """The fingerprint the stage directory will have, from the settings and the inputs' sizes and mtimes."""
    _, inputs = _stage_inputs(config)
    return stage_fingerprint(STAGE, config.output_config(), inputs, FORMAT_VERSION)


def shard_corpus(config: ShardConfig, map_jobs: Mapper | None = None) -> dict:
    """Run the shard stage (or find it already done) and return its manifest.

    ``map_jobs`` runs the read tasks and then the shard writes (``data_prep.parallel``: jobs carry all they
    need); None: ``config.workers`` local processes.
    """
    units, inputs = _stage_inputs(config)
    stage = begin_stage(config.out, STAGE, config.output_config(), inputs, FORMAT_VERSION, force=config.force)
    spill_root = stage.path(SPILL_DIR)
    if stage.complete:
        log.info("shard: %s is already complete for this configuration and input; nothing to do", config.out)
        shutil.rmtree(spill_root, ignore_errors=True)
        return read_manifest(config.out)

    mapper = _local_mapper(config.workers) if map_jobs is None else contextlib.nullcontext(map_jobs)
    with mapper as map_jobs:
        started = time.perf_counter()
        read = _read_inputs(units, config, spill_root, map_jobs)
        log.info("shard: read %d documents in %.1f s", read["documents_read"], time.perf_counter() - started)
        if read["documents_read"] == 0:
            raise StageError(
                f"empty corpus: {read['input_units']} inputs under {', '.join(config.inputs)} hold no text "
                f"documents ({read['binary_files_skipped']} binary files skipped, {read['bad_records']} "
                f"records without a {config.text_field!r} text field)"
            )
        if config.near_dup_threshold > 0:
            started = time.perf_counter()
            dropped = _drop_near_duplicates(stage.directory, config)
            # the one serial step between the parallel passes: its time is what more workers cannot cut
            log.info("shard: near-duplicate pass: %d to drop, %.1f s", dropped, time.perf_counter() - started)
        started = time.perf_counter()
        shard_stats = _write_shards(stage.directory, config, map_jobs)
        log.info("shard: wrote %d shards in %.1f s", config.num_shards, time.perf_counter() - started)

    stats = _stage_stats(read, shard_stats)
    files = [
        file_entry(stage.directory, part_path(split, s), rows=shard_stats[s][split]["documents"])
        for split in SPLITS
        for s in range(config.num_shards)
    ]
    if config.near_dup_threshold > 0:
        files.append(file_entry(stage.directory, NEAR_DUPLICATES))
    manifest = stage.commit(files, stats)
    shutil.rmtree(spill_root, ignore_errors=True)
    log.info(
        "shard: %d documents (%d train, %d valid), %d sentences, %d words in %d shards; %d duplicates and "
        "%d near-duplicates dropped",
        stats["documents"],
        stats["splits"]["train"]["documents"],
        stats["splits"]["valid"]["documents"],
        stats["sentences"],
        stats["words"],
        config.num_shards,
        stats["dropped"]["duplicate"],
        stats["dropped"]["near_duplicate"],
    )
    return manifest


def _stage_stats(read: Counter, shard_stats: list[dict]) -> dict:
    splits = {split: Counter() for split in SPLITS}
    for result in shard_stats:
        for split in SPLITS:
            splits[split].update(result[split])
    total = splits["train"] + splits["valid"]
    return {
        "documents": total["documents"],
        "sentences": total["sentences"],
        "words": total["words"],
        "cjk_characters": total["cjk_characters"],
        "bytes": total["bytes"],
        "short_documents": total["short_documents"],
        "dropped": {
            "empty": read["dropped_empty"],
            "duplicate": sum(r["duplicates"] for r in shard_stats),
            "near_duplicate": sum(r.get("near_duplicates", 0) for r in shard_stats),
            "bad_records": read["bad_records"],
        },
        "input_units": read["input_units"],
        "input_bytes": read["input_bytes"],
        "decode_fallback_files": read["decode_fallback_files"],
        "decode_fallback_lines": read["decode_fallback_lines"],
        "binary_files_skipped": read["binary_files_skipped"],
        "unreadable_files": read["unreadable_files"],
        "long_sentences_split": read["long_sentences_split"],
        "splits": {split: dict(counts) for split, counts in splits.items()},
    }
