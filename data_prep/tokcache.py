"""The cache of tokenised documents, so a corpus is tokenised once per vocabulary.

Layout: ``<cache_root>/tokens-<fingerprint[:16]>/{train,valid}/part-XXXXX.arrow`` (one per corpus shard, same
name) plus ``part-XXXXX.json`` (its counts, written after it: a shard is cached when both exist) and
``cache.json`` (what the fingerprint covers). The fingerprint covers the content of the corpus (the sha256
of every shard, as the shard manifest lists them), the vocabulary fingerprint, its casing and the cache
format, so any seed, masking setting or sequence length reuses it, and another corpus never does. A shard is
hashed and checked against its manifest when it is tokenised, and again on reuse when it changed after its
cache was written (mtimes), so an edited shard is refused rather than read, or stood in for by the tokens
of what it held before.

Each ``.arrow`` file is an Arrow IPC file, one row per document: ``doc_id`` int64, ``ids`` list<uint16|int32>
(all WordPieces of the document, no special tokens), ``sentence_offsets`` list<int32> (``num_sentences + 1``
boundaries into ``ids``, starting at 0) and, for a Chinese corpus, ``continues_word`` list<bool> (per token:
in the same jieba word as the token before it, data_prep/zh_words.py; the segmenter and its version are in
the fingerprint). Sentences that tokenise to nothing and documents left empty are dropped, as Google drops
them. Record batches hold about ``BLOCK_SENTENCES`` sentences, so readers stream with bounded memory.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from itertools import chain
from operator import attrgetter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import zh_words
from data_prep.examples import DocumentBlock, segment_index
from data_prep.manifest import atomic_path, changed_file_error, fingerprint, sha256_file, write_json_atomic
from data_prep.schema import token_id_type
from data_prep.writer import list_offsets, numpy_type, to_arrow, to_numpy

log = logging.getLogger(__name__)

# 2: block token counts in the sidecar (work is split by blocks); 3: content keys; 4: continues_word (Chinese
# word segmentation) and the segmenter in the key
CACHE_FORMAT_VERSION = 4
BLOCK_SENTENCES = 8192  # sentences per cache record batch, at least (whole documents)
ENCODE_SENTENCES = 1024  # sentences per tokenizer call, across document boundaries (bounds its output)
CORPUS_READ_ROWS = 8  # documents read from a corpus shard at a time (books are big); blocks end on multiples
PARQUET_BUFFER_BYTES = 1 << 20  # stream a row group's pages instead of loading the whole column chunk


def cache_schema(vocab_size: int, segmented: bool = False) -> pa.Schema:
    """The cache files' schema; ``segmented``: with the ``continues_word`` column."""
    fields = [
        ("doc_id", pa.int64()),
        ("ids", pa.list_(token_id_type(vocab_size))),
        ("sentence_offsets", pa.list_(pa.int32())),
    ]
    if segmented:
        fields.append(("continues_word", pa.list_(pa.bool_())))
    return pa.schema(fields)


def corpus_content_key(corpus_dir: str | Path, corpus_manifest: dict) -> str:
    """A digest of the corpus shards' content: their paths and sha256 as the manifest lists them (files
    listed without one are hashed here)."""
    return fingerprint(
        sorted(
            (entry["path"], entry.get("sha256") or sha256_file(Path(corpus_dir) / entry["path"]))
            for entry in corpus_manifest["files"]
        )
    )


def cache_directory(cache_root: str | Path, corpus_key: str, vocab, segmenter: str | None = None) -> Path:
    """The cache directory of one (corpus content, vocabulary, word segmenter) triple; writes its cache.json
    if new.

    ``corpus_key``: ``corpus_content_key`` of the corpus, so the cache follows what the shards hold;
    ``segmenter``: ``zh_words.segmenter_for(language)``, None for a corpus that is not segmented into words.
    """
    key = {
        "corpus": corpus_key,
        "vocab": vocab.fingerprint,
        "lowercase": vocab.lowercase,
        "segmenter": segmenter,
        "format_version": CACHE_FORMAT_VERSION,
    }
    directory = Path(cache_root) / f"tokens-{fingerprint(key)[:16]}"
    if not (directory / "cache.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / "cache.json", key)
    return directory


def encode_sentences(tokenizer, sentences: list[str]) -> list:
    """The tokenizer's encodings of a batch of sentences, without special tokens (releases the GIL)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return encode(sentences, add_special_tokens=False)


def encode_sentences_with_offsets(tokenizer, sentences: list[str]) -> list:
    """``encode_sentences`` with each token's character offsets (``encode_batch_fast`` leaves them zero)."""
    return tokenizer.encode_batch(sentences, add_special_tokens=False)


def ids_of(encodings: list, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, tokens per sentence) of encodings: one pass, no per-encoding list kept alive."""
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    flat = np.fromiter(
        chain.from_iterable(map(attrgetter("ids"), encodings)), dtype=dtype, count=int(lengths.sum())
    )
    return flat, lengths


def _cache_batch(
    doc_ids: list[int],
    sentences_per_doc: np.ndarray,
    flat: np.ndarray,
    lengths: np.ndarray,
    schema,
    continues: np.ndarray | None = None,
) -> pa.RecordBatch:
    """One cache record batch from the tokenised sentences of whole documents (``continues``: per token of
    ``flat``, for the ``continues_word`` column of a segmented cache)."""
    num_docs = len(doc_ids)
    sentence_doc = np.repeat(np.arange(num_docs), sentences_per_doc)
    kept = lengths > 0
    lengths, sentence_doc = lengths[kept], sentence_doc[kept]
    kept_per_doc = np.bincount(sentence_doc, minlength=num_docs)
    nonempty = kept_per_doc > 0
    tokens_per_doc = np.bincount(sentence_doc, weights=lengths, minlength=num_docs).astype(np.int64)
    token_offsets = np.zeros(int(nonempty.sum()) + 1, dtype=np.int32)
    np.cumsum(tokens_per_doc[nonempty], out=token_offsets[1:])
    # Per document its own sentence boundaries starting at 0: num_sentences + 1 values each.
    kept_counts = kept_per_doc[nonempty]
    bound_offsets = np.zeros(len(kept_counts) + 1, dtype=np.int32)
    np.cumsum(kept_counts + 1, out=bound_offsets[1:])
    within = np.cumsum(lengths) - np.repeat(
        np.cumsum(tokens_per_doc[nonempty]) - tokens_per_doc[nonempty], kept_counts
    )
    bounds = np.zeros(int(bound_offsets[-1]), dtype=np.int32)
    sentence_slot = np.arange(len(lengths)) + np.repeat(np.arange(len(kept_counts)), kept_counts) + 1
    bounds[sentence_slot] = within
    ids_type, bounds_type = schema.field("ids").type, schema.field("sentence_offsets").type
    columns = [
        to_arrow(np.asarray(doc_ids, dtype=np.int64)[nonempty], pa.int64()),
        pa.ListArray.from_arrays(
            to_arrow(token_offsets, pa.int32()), to_arrow(flat, ids_type.value_type), type=ids_type
        ),
        pa.ListArray.from_arrays(
            to_arrow(bound_offsets, pa.int32()), to_arrow(bounds, pa.int32()), type=bounds_type
        ),
    ]
    if "continues_word" in schema.names:
        bits = pa.Array.from_buffers(
            pa.bool_(), len(continues), [None, pa.py_buffer(np.packbits(continues, bitorder="little"))]
        )
        list_type = schema.field("continues_word").type
        columns.append(pa.ListArray.from_arrays(to_arrow(token_offsets, pa.int32()), bits, type=list_type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _bool_values(array: pa.ListArray, first: int, stop: int) -> np.ndarray:
    """Values ``first .. stop - 1`` of a list<bool> array as a numpy bool array (unpacked from its bitmap)."""
    values = array.values
    if stop <= first:
        return np.zeros(0, dtype=bool)
    start = values.offset + first
    bitmap = np.frombuffer(values.buffers()[1], dtype=np.uint8)
    return np.unpackbits(bitmap, count=start + (stop - first), bitorder="little")[start:].astype(bool)


def _corpus_documents(corpus_file: Path) -> Iterator[tuple[int, pa.Array]]:
    """(doc id, its sentences as an Arrow string array) of each document of a corpus shard, streamed.

    No pre-buffering and no reader threads: pyarrow would otherwise read the compressed column chunks of
    every row group ahead (memory that grows with the shard), and each reader thread keeps its own heap.
    Sentences stay in Arrow (compact) until the tokenizer takes them, ENCODE_SENTENCES at a time.
    """
    parquet = pq.ParquetFile(corpus_file, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
    batches = parquet.iter_batches(
        batch_size=CORPUS_READ_ROWS, columns=["doc_id", "sentences"], use_threads=False
    )
    for rows in batches:
        sentences = rows.column("sentences")
        offsets = list_offsets(sentences).astype(np.int64)
        values = sentences.values
        for i, doc_id in enumerate(rows.column("doc_id").to_pylist()):
            yield doc_id, values.slice(offsets[i], offsets[i + 1] - offsets[i])


class _BlockBuilder:
    """Tokenises documents into one cache block, ENCODE_SENTENCES sentences per tokenizer call.

    Sentences are encoded in fixed-size chunks whatever the document boundaries (a book is many chunks)
    and only their ids are kept (``id_type``: 2 bytes a token for a BERT vocabulary), so neither the
    tokenizer's heavy per-token Encoding objects nor Python strings exist for more than one chunk.
    ``segmented``: the chunk's Chinese words are found too (``continues_word`` per token).
    """

    def __init__(self, tokenizer, id_type, segmented: bool = False) -> None:
        self.tokenizer, self.id_type, self.segmented = tokenizer, id_type, segmented
        self.continue_parts: list[np.ndarray] = []
        self.doc_ids: list[int] = []
        self.sentences_per_doc: list[int] = []
        self.pending: list[str] = []
        self.id_parts: list[np.ndarray] = []
        self.length_parts: list[np.ndarray] = []
        self.num_sentences = 0

    def add(self, doc_id: int, sentences: pa.Array) -> None:
        self.doc_ids.append(doc_id)
        self.sentences_per_doc.append(len(sentences))
        self.num_sentences += len(sentences)
        start = 0
        while start < len(sentences):
            take = min(ENCODE_SENTENCES - len(self.pending), len(sentences) - start)
            self.pending.extend(sentences.slice(start, take).to_pylist())
            start += take
            if len(self.pending) >= ENCODE_SENTENCES:
                self._encode()

    def _encode(self) -> None:
        if self.pending:
            if self.segmented:
                encodings = encode_sentences_with_offsets(self.tokenizer, self.pending)
            else:
                encodings = encode_sentences(self.tokenizer, self.pending)
            flat, lengths = ids_of(encodings, self.id_type)
            if self.segmented:
                self.continue_parts.append(zh_words.sentences_continue_word(self.pending, encodings))
            del encodings
            self.id_parts.append(flat)
            self.length_parts.append(lengths)
            self.pending = []

    def finish(self) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(doc ids, sentences per document, flat ids, tokens per sentence, continues_word per token or
        None) of the block."""
        self._encode()
        flat = np.concatenate(self.id_parts) if self.id_parts else np.zeros(0, dtype=self.id_type)
        lengths = np.concatenate(self.length_parts) if self.length_parts else np.zeros(0, dtype=np.int64)
        continues = None
        if self.segmented:
            parts = self.continue_parts
            continues = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
        return self.doc_ids, np.asarray(self.sentences_per_doc, dtype=np.int64), flat, lengths, continues


def _blocks(corpus_file: Path, tokenizer, id_type, segmented: bool = False) -> Iterator[tuple]:
    """The tokenised blocks of a corpus shard: a block ends after a multiple of CORPUS_READ_ROWS documents
    once it holds at least BLOCK_SENTENCES sentences (counted by row, so the blocks depend on the shard's
    rows only, not on its Parquet row groups)."""
    builder = _BlockBuilder(tokenizer, id_type, segmented)
    for row, (doc_id, sentences) in enumerate(_corpus_documents(corpus_file), start=1):
        builder.add(doc_id, sentences)
        if row % CORPUS_READ_ROWS == 0 and builder.num_sentences >= BLOCK_SENTENCES:
            yield builder.finish()
            builder = _BlockBuilder(tokenizer, id_type, segmented)
    if builder.doc_ids:
        yield builder.finish()


_DONE = object()


def _encoded_blocks(corpus_file: Path, tokenizer, id_type, segmented: bool = False) -> Iterator[tuple]:
    """``_blocks`` read and tokenised by a thread (the tokenizer releases the GIL), so building and writing
    a block overlaps with tokenising the next; at most one finished block waits in the hand-off."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in _blocks(corpus_file, tokenizer, id_type, segmented):
                if not put(block):
                    return
            put(_DONE)
        except BaseException as error:  # re-raised in the consumer
            put(error)

    thread = threading.Thread(target=produce, name="tokenise", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def check_corpus_file(corpus_file: Path, expected_sha256: str | None, cache_file: Path | None = None) -> None:
    """A StageError when a corpus shard's sha256 is not ``expected_sha256`` (the shard manifest's).

    ``cache_file``: the shard's cache, trusted without hashing when it was written after the shard last
    changed (and touched after a hash that matched, so a copied corpus is hashed once).
    """
    corpus_file = Path(corpus_file)
    if expected_sha256 is None:
        return
    if cache_file is not None and corpus_file.stat().st_mtime_ns < cache_file.stat().st_mtime_ns:
        return
    if sha256_file(corpus_file) != expected_sha256:
        raise changed_file_error(corpus_file, "shard", "sha256 differs", corpus_file.parent.parent)
    if cache_file is not None:  # newer than the shard from now on, even one stamped ahead by another clock
        stamp = max(time.time_ns(), corpus_file.stat().st_mtime_ns + 1)
        os.utime(cache_file, ns=(stamp, stamp))


def build_shard_cache(
    corpus_file: Path,
    cache_file: Path,
    vocab,
    expected_sha256: str | None = None,
    segmenter: str | None = None,
) -> dict:
    """Tokenise one corpus shard into its cache file (atomically); returns its counts.

    ``expected_sha256``: the shard manifest's; a file that no longer has it is refused before it is read.
    ``segmenter``: the cache directory's (``zh_words.segmenter_for``): Chinese words are found when set.
    """
    corpus_file, cache_file = Path(corpus_file), Path(cache_file)
    check_corpus_file(corpus_file, expected_sha256)
    segmented = segmenter is not None
    if segmented and segmenter != zh_words.segmenter_name():
        raise ValueError(f"the cache is keyed for {segmenter}, this process has {zh_words.segmenter_name()}")
    schema = cache_schema(vocab.size, segmented)
    id_type = numpy_type(schema.field("ids").type.value_type)
    counts = {"documents": 0, "sentences": 0, "tokens": 0, "block_tokens": []}
    with (
        atomic_path(cache_file) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):
        for doc_ids, sentences_per_doc, flat, lengths, continues in _encoded_blocks(
            corpus_file, vocab.tokenizer, id_type, segmented
        ):
            batch = _cache_batch(doc_ids, sentences_per_doc, flat, lengths, schema, continues)
            writer.write_batch(batch)
            counts["documents"] += batch.num_rows
            counts["sentences"] += int((lengths > 0).sum())
            counts["tokens"] += len(flat)
            counts["block_tokens"].append(len(flat))
    write_json_atomic(cache_file.with_suffix(".json"), counts)
    return counts


def shard_counts(cache_file: Path) -> dict | None:
    """The counts of a cached shard, or None when it is not (completely) cached."""
    sidecar = cache_file.with_suffix(".json")
    if not (cache_file.exists() and sidecar.exists()):
        return None
    try:
        return json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cached_shard_counts(cache_file: Path, corpus_file: Path, expected_sha256: str | None) -> dict | None:
    """``shard_counts`` of a cached shard whose corpus file still holds what the manifest says (else a
    StageError naming it), or None when the shard is not cached."""
    counts = shard_counts(cache_file)
    if counts is not None:
        check_corpus_file(corpus_file, expected_sha256, cache_file)
    return counts


def _block_arrays(batch: pa.RecordBatch) -> tuple[np.ndarray, ...]:
    """(ids, sentence offsets into ids, per-document counts of boundaries, doc ids, continues_word or None)
    of a cache batch."""
    ids_col, bounds_col = batch.column("ids"), batch.column("sentence_offsets")
    token_offsets = list_offsets(ids_col).astype(np.int64)
    ids = to_numpy(ids_col.values)[token_offsets[0] : token_offsets[-1]]
    bound_offsets = list_offsets(bounds_col).astype(np.int64)
    local = to_numpy(bounds_col.values)[bound_offsets[0] : bound_offsets[-1]].astype(np.int64)
    bounds_per_doc = np.diff(bound_offsets)
    sent_offsets = local + np.repeat(token_offsets[:-1] - token_offsets[0], bounds_per_doc)
    continues = None
    if "continues_word" in batch.schema.names:
        continues = _bool_values(batch.column("continues_word"), token_offsets[0], token_offsets[-1])
    return ids, sent_offsets, bounds_per_doc, to_numpy(batch.column("doc_id")), continues


def block_from_batch(batch: pa.RecordBatch) -> DocumentBlock:
    """A DocumentBlock view of one cache record batch (ids zero-copy, boundaries as Python lists)."""
    ids, sent_offsets, bounds_per_doc, doc_ids, continues = _block_arrays(batch)
    doc_bounds = np.zeros(len(bounds_per_doc) + 1, dtype=np.int64)
    np.cumsum(bounds_per_doc, out=doc_bounds[1:])
    return DocumentBlock(ids, sent_offsets.tolist(), doc_bounds.tolist(), doc_ids.tolist(), continues)


def iter_blocks(cache_file: Path, first: int = 0, stop: int | None = None) -> Iterator[DocumentBlock]:
    """Record batches ``first .. stop - 1`` of a cache file as DocumentBlocks, memory-mapped."""
    with pa.memory_map(str(cache_file)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(first, reader.num_record_batches if stop is None else stop):
            yield block_from_batch(reader.get_batch(i))


def _unit_hash(doc_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per document id (splitmix64), the same in every process."""
    with np.errstate(over="ignore"):
        z = doc_ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_pool(cache_files: list[Path], total_tokens: int, max_tokens: int, seed: int) -> DocumentBlock:
    """The negative pool of a split: every document when the split has at most ``max_tokens`` tokens,
    otherwise a uniform sample of documents (by a hash of doc_id and seed) of about that many tokens.

    Random next segments are drawn from this pool, so they come from the whole corpus (not only the
    current shard) while a worker's memory stays bounded by ``max_tokens``.
    """
    keep_share = 1.0 if total_tokens <= max_tokens else max_tokens / total_tokens
    id_parts, bound_parts, count_parts, doc_parts, continue_parts = [], [], [], [], []
    token_base = 0
    for cache_file in cache_files:
        with pa.memory_map(str(cache_file)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                ids, sent_offsets, bounds_per_doc, doc_ids, continues = _block_arrays(reader.get_batch(i))
                if keep_share < 1.0:
                    keep = _unit_hash(doc_ids, seed) < keep_share
                    if not keep.any():
                        continue
                    first = np.cumsum(bounds_per_doc) - bounds_per_doc
                    kept_bounds = sent_offsets[segment_index(first[keep], bounds_per_doc[keep])]
                    doc_starts, doc_ends = (
                        sent_offsets[first[keep]],
                        sent_offsets[first[keep] + bounds_per_doc[keep] - 1],
                    )
                    kept_tokens = segment_index(doc_starts, doc_ends - doc_starts)
                    ids = ids[kept_tokens]
                    if continues is not None:
                        continues = continues[kept_tokens]
                    shift = np.repeat(
                        np.cumsum(doc_ends - doc_starts) - (doc_ends - doc_starts) - doc_starts,
                        bounds_per_doc[keep],
                    )
                    sent_offsets, bounds_per_doc, doc_ids = (
                        kept_bounds + shift,
                        bounds_per_doc[keep],
                        doc_ids[keep],
                    )
                if len(doc_ids) == 0:
                    continue
                bound_parts.append(sent_offsets + token_base)
                count_parts.append(bounds_per_doc)
                id_parts.append(np.array(ids))  # a copy: the memory map closes
                if continues is not None:
                    continue_parts.append(continues)  # unpacked: already a copy
                doc_parts.append(np.array(doc_ids))
                token_base += len(ids)
    if not doc_parts:
        return DocumentBlock(np.zeros(0, dtype=np.uint16), [0], [0], [])
    doc_bounds = np.zeros(sum(len(c) for c in count_parts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(count_parts), out=doc_bounds[1:])
    return DocumentBlock(
        np.concatenate(id_parts),
        np.concatenate(bound_parts).tolist(),
        doc_bounds.tolist(),
        np.concatenate(doc_parts).tolist(),
        np.concatenate(continue_parts) if continue_parts else None,
    )
