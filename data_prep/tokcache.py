"""The cache of tokenised documents, so a corpus is tokenised once per vocabulary.

Layout: ``<cache_root>/tokens-<fingerprint[:16]>/{train,valid}/part-XXXXX.arrow`` (one per corpus shard, same
name) plus ``part-XXXXX.json`` (its counts, written after it: a shard is cached when both exist) and
``cache.json`` (what the fingerprint covers). The fingerprint covers the corpus fingerprint, the vocabulary
fingerprint, its casing and the cache format, so any seed, masking setting or sequence length reuses it.

Each ``.arrow`` file is an Arrow IPC file, one row per document: ``doc_id`` int64, ``ids`` list<uint16|int32>
(all WordPieces of the document, no special tokens), ``sentence_offsets`` list<int32> (``num_sentences + 1``
boundaries into ``ids``, starting at 0). Sentences that tokenise to nothing and documents left empty are
dropped, as Google drops them. Record batches hold about ``BLOCK_SENTENCES`` sentences, so readers stream
with bounded memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.examples import DocumentBlock
from data_prep.manifest import atomic_path, fingerprint, write_json_atomic
from data_prep.schema import token_id_type

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
BLOCK_SENTENCES = 8192  # sentences per tokenizer call and per cache record batch (bounds memory)
CORPUS_READ_ROWS = 8  # documents read from a corpus shard at a time (books are big)


def cache_schema(vocab_size: int) -> pa.Schema:
    return pa.schema(
        [
            ("doc_id", pa.int64()),
            ("ids", pa.list_(token_id_type(vocab_size))),
            ("sentence_offsets", pa.list_(pa.int32())),
        ]
    )


def cache_directory(cache_root: str | Path, corpus_fingerprint: str, vocab) -> Path:
    """The cache directory of one (corpus, vocabulary) pair; writes its cache.json if new."""
    key = {
        "corpus": corpus_fingerprint,
        "vocab": vocab.fingerprint,
        "lowercase": vocab.lowercase,
        "format_version": CACHE_FORMAT_VERSION,
    }
    directory = Path(cache_root) / f"tokens-{fingerprint(key)[:16]}"
    if not (directory / "cache.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / "cache.json", key)
    return directory


def tokenize_sentences(tokenizer, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids int64, tokens per sentence) of a batch of sentences, without special tokens."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode(sentences, add_special_tokens=False)
    id_lists = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _tokenize_documents(
    tokenizer, doc_ids: list[int], documents: list[list[str]], schema: pa.Schema
) -> pa.RecordBatch:
    """One cache record batch from sentence-split documents."""
    id_dtype = schema.field("ids").type.value_type.to_pandas_dtype()
    sentences = [s for doc in documents for s in doc]
    flat, lengths = tokenize_sentences(tokenizer, sentences)
    sentences_per_doc = np.array([len(doc) for doc in documents], dtype=np.int64)
    sentence_doc = np.repeat(np.arange(len(documents)), sentences_per_doc)
    kept = lengths > 0
    lengths, sentence_doc = lengths[kept], sentence_doc[kept]
    kept_per_doc = np.bincount(sentence_doc, minlength=len(documents))
    nonempty = kept_per_doc > 0
    tokens_per_doc = np.bincount(sentence_doc, weights=lengths, minlength=len(documents)).astype(np.int64)
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
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.asarray(doc_ids, dtype=np.int64)[nonempty]),
            pa.ListArray.from_arrays(token_offsets, pa.array(flat.astype(id_dtype))),
            pa.ListArray.from_arrays(bound_offsets, pa.array(bounds)),
        ],
        schema=schema,
    )


def build_shard_cache(corpus_file: Path, cache_file: Path, vocab) -> dict:
    """Tokenise one corpus shard into its cache file (atomically); returns its counts."""
    corpus_file, cache_file = Path(corpus_file), Path(cache_file)
    schema = cache_schema(vocab.size)
    counts = {"documents": 0, "sentences": 0, "tokens": 0}
    pending_ids: list[int] = []
    pending_docs: list[list[str]] = []

    def flush(writer) -> None:
        batch = _tokenize_documents(vocab.tokenizer, pending_ids, pending_docs, schema)
        writer.write_batch(batch)
        counts["documents"] += batch.num_rows
        counts["sentences"] += len(batch.column("sentence_offsets").values) - batch.num_rows
        counts["tokens"] += len(batch.column("ids").values)
        pending_ids.clear()
        pending_docs.clear()

    with (
        atomic_path(cache_file) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):
        parquet = pq.ParquetFile(corpus_file)
        pending_sentences = 0
        for rows in parquet.iter_batches(batch_size=CORPUS_READ_ROWS, columns=["doc_id", "sentences"]):
            pending_ids.extend(rows.column("doc_id").to_pylist())
            docs = rows.column("sentences").to_pylist()
            pending_docs.extend(docs)
            pending_sentences += sum(map(len, docs))
            if pending_sentences >= BLOCK_SENTENCES:
                flush(writer)
                pending_sentences = 0
        if pending_docs:
            flush(writer)
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


def block_from_batch(batch: pa.RecordBatch) -> DocumentBlock:
    """A DocumentBlock view of one cache record batch (ids zero-copy, boundaries as Python lists)."""
    ids_col = batch.column("ids")
    bounds_col = batch.column("sentence_offsets")
    token_offsets = ids_col.offsets.to_numpy().astype(np.int64)
    ids = ids_col.values.to_numpy()
    bound_offsets = bounds_col.offsets.to_numpy().astype(np.int64)
    local = bounds_col.values.to_numpy()[bound_offsets[0] : bound_offsets[-1]].astype(np.int64)
    bound_offsets = bound_offsets - bound_offsets[0]
    sent_offsets = local + np.repeat(token_offsets[:-1], np.diff(bound_offsets))
    return DocumentBlock(
        ids=ids,
        sent_offsets=sent_offsets.tolist(),
        doc_bounds=bound_offsets.tolist(),
        doc_ids=batch.column("doc_id").to_pylist(),
    )


def iter_blocks(cache_file: Path) -> Iterator[DocumentBlock]:
    """The cache file's record batches as DocumentBlocks, read one at a time (not memory-mapped)."""
    with pa.OSFile(str(cache_file), "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
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
    id_parts, bound_parts, doc_parts, count_parts = [], [], [], []
    token_base = 0
    for cache_file in cache_files:
        with pa.OSFile(str(cache_file), "rb") as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if keep_share < 1.0:
                    doc_ids = batch.column("doc_id").to_numpy()
                    batch = batch.filter(pa.array(_unit_hash(doc_ids, seed) < keep_share))
                if batch.num_rows == 0:
                    continue
                ids_col = batch.column("ids")
                token_offsets = ids_col.offsets.to_numpy().astype(np.int64)
                ids = ids_col.values.to_numpy()[token_offsets[0] : token_offsets[-1]]
                bounds_col = batch.column("sentence_offsets")
                bound_offsets = bounds_col.offsets.to_numpy().astype(np.int64)
                local = bounds_col.values.to_numpy()[bound_offsets[0] : bound_offsets[-1]].astype(np.int64)
                starts = token_offsets[:-1] - token_offsets[0] + token_base
                bound_parts.append(local + np.repeat(starts, np.diff(bound_offsets)))
                count_parts.append(np.diff(bound_offsets))
                id_parts.append(np.array(ids))
                doc_parts.append(batch.column("doc_id").to_numpy())
                token_base += len(ids)
    if not doc_parts:
        return DocumentBlock(np.zeros(0, dtype=np.uint16), [0], [0], [])
    bounds = np.concatenate(bound_parts)
    doc_bounds = np.zeros(sum(len(c) for c in count_parts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(count_parts), out=doc_bounds[1:])
    return DocumentBlock(
        np.concatenate(id_parts), bounds.tolist(), doc_bounds.tolist(), np.concatenate(doc_parts).tolist()
    )
