"""Near-duplicate detection for the shard stage: MinHash signatures (rensa) and a global LSH pass over them.

A document becomes a set of shingles: runs of ``SHINGLE_SIZE`` consecutive *units*, where a unit is one
CJK character (Chinese and Japanese are written without spaces, so characters are their shingle units) or
one run of other letters and digits (a word). Case and punctuation are ignored. So English text gets
5-word shingles, Chinese 5-character shingles, and mixed text a mix. The set's MinHash signature
(``NUM_PERM`` 32-bit values, 512 bytes) estimates the Jaccard similarity of two documents as the share of
equal values.

``find_near_duplicates`` cuts every signature into LSH bands; two documents that agree on a whole band
are candidates and are kept as a pair when their estimated Jaccard reaches the threshold. Documents are
visited in ``rank`` order (the shard stage ranks by content digest) and one is dropped when it pairs with
an earlier document that was kept, so which copy survives is a pure function of content, and every dropped
document names a kept one it is similar to (A~B and B~C with A≁C drops B only).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from importlib.metadata import version

import numpy as np
import rensa

from data_prep.cjk import CJK_WORD_CHARS

SHINGLE_SIZE = 5  # units per shingle: 5 words / 5 CJK characters, as in the usual web-corpus dedup recipes
NUM_PERM = 128  # signature values: ±0.035 standard error on a Jaccard of 0.8, 512 bytes per document
MINHASH_SEED = 1  # fixed: signatures must agree across processes and runs
_CJK = CJK_WORD_CHARS.pattern[1:-1]  # ideographs and kana: the characters the stage counts as words
_UNITS = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_CHUNK_UNITS = 1 << 16  # units shingled at a time within one document (~5 MB of shingle strings)
_SIGN_BATCH = 1024  # documents shingled at a time: a batch's shingle strings stay ~10-100 MB
_PAIR_CHUNK = 1 << 20  # candidate pairs compared per numpy step (bounds the temporary at ~0.5 GB)


def method() -> str:
    """What decides the signatures: recorded in the stage fingerprint, so a change re-runs the stage."""
    return (
        f"rensa {version('rensa')} RMinHash v{rensa.RMinHash.ALGORITHM_VERSION}, {NUM_PERM} perm, "
        f"seed {MINHASH_SEED}, {SHINGLE_SIZE}-unit shingles"
    )


def units(text: str) -> list[str]:
    """The shingle units of ``text``: single CJK characters and lower-cased words; punctuation dropped."""
    return _UNITS.findall(text.lower())


def shingle_chunks(sentences: list[str], size: int = SHINGLE_SIZE) -> Iterator[list[str]]:
    """The document's shingles (``size`` consecutive units, across sentence ends), in lists of about
    ``_CHUNK_UNITS``: a 50 MB one-line "document" is signed in bounded memory. None below ``size`` units."""
    words: list[str] = []
    for sentence in sentences:
        words.extend(units(sentence))
        if len(words) >= _CHUNK_UNITS:
            yield [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]
            words = words[len(words) - size + 1 :]  # the next chunk's shingles start where these stop
    if len(words) >= size:
        yield [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]


def shingles(sentences: list[str], size: int = SHINGLE_SIZE) -> list[str]:
    """The document's shingles (``size`` consecutive units); empty when it has fewer than ``size`` units."""
    return [shingle for chunk in shingle_chunks(sentences, size) for shingle in chunk]


def signatures(documents: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(signatures ``(n, NUM_PERM)`` uint32 of the documents long enough to have a shingle, their indices).

    Documents shorter than one shingle get none: too short to call a near-duplicate (exact copies are
    still removed by the content digest).
    """
    rows: dict[int, np.ndarray] = {}
    for start in range(0, len(documents), _SIGN_BATCH):
        batch = {}  # one-chunk documents, signed together in one call
        for i in range(start, min(start + _SIGN_BATCH, len(documents))):
            chunks = shingle_chunks(documents[i])
            first = next(chunks, None)
            second = next(chunks, None) if first is not None else None
            if second is None:
                if first is not None:
                    batch[i] = first
                continue
            sketch = rensa.RMinHash(NUM_PERM, MINHASH_SEED)  # the same signature, fed a chunk at a time
            for chunk in (first, second, *chunks):
                sketch.update(chunk)
            rows[i] = np.array(sketch.digest(), dtype=np.uint32)
        if batch:
            matrix = rensa.RMinHash.digest_matrix_from_token_sets(
                list(batch.values()), NUM_PERM, MINHASH_SEED
            )
            rows.update(zip(batch, np.array(matrix.to_rows(), dtype=np.uint32), strict=True))
    index = np.array(sorted(rows), dtype=np.int64)
    signed = np.stack([rows[i] for i in index]) if len(index) else np.zeros((0, NUM_PERM), np.uint32)
    return signed, index


@functools.lru_cache
def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) for the S-curve ``P(candidate) = 1 - (1 - J^rows)^bands`` with the least weighted
    area of false candidates below ``threshold`` and missed pairs above it (datasketch's criterion).

    Missed pairs weigh 0.9, not datasketch's 0.5: every candidate is verified on its signature, so a false one
    costs one comparison while a missed one keeps a duplicate (0.8: 14 bands of 9 rows, 87% of the pairs at
    exactly 0.8 and 95% at 0.83 become candidates, against 40% and 57% at equal weights).
    """
    grid = np.linspace(0.0, 1.0, 1001)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            hit = 1.0 - (1.0 - grid**rows) ** bands
            error = np.trapezoid(np.where(grid < threshold, 0.1 * hit, 0.9 * (1.0 - hit)), grid)
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def _band_keys(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One 64-bit key per document for one band (FNV-style mix; a collision only adds a candidate)."""
    key = np.full(len(signatures), 0xCBF29CE484222325, dtype=np.uint64)
    for column in range(band * rows, (band + 1) * rows):
        key = (key ^ signatures[:, column].astype(np.uint64)) * np.uint64(0x100000001B3)
    return key


def find_near_duplicates(
    signatures: np.ndarray, rank: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dropped, kept, similarity): the rows to drop, for each the kept row it matches, and their estimated
    Jaccard, sorted by the dropped row's rank.

    ``rank``: a distinct number per row; the lower-ranked of two near-duplicates is visited first. Within an
    LSH bucket every document is compared with the bucket's first document and with its predecessor, so the
    candidate pairs grow linearly with the corpus even when thousands of templated pages share a bucket.
    Memory: the signatures plus ~40 bytes per document per band step, plus the pairs that pass.
    """
    num_docs, num_perm = signatures.shape
    empty = np.zeros(0, np.int64)
    if num_docs < 2:
        return empty, empty, np.zeros(0)
    bands, rows = lsh_bands(threshold, num_perm)
    found_a, found_b, found_sim = [], [], []
    for band in range(bands):
        keys = _band_keys(signatures, band, rows)
        order = np.lexsort((rank, keys))  # by key, then by rank inside a bucket
        sorted_keys = keys[order]
        follows = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1  # positions not first in a bucket
        if not len(follows):
            continue
        starts = np.zeros(num_docs, dtype=np.int64)
        starts[1:] = np.where(sorted_keys[1:] != sorted_keys[:-1], np.arange(1, num_docs), 0)
        first = np.maximum.accumulate(starts)  # the position where each position's bucket begins
        later = order[follows]
        for earlier in (order[first[follows]], order[follows - 1]):
            for lo in range(0, len(later), _PAIR_CHUNK):
                a, b = earlier[lo : lo + _PAIR_CHUNK], later[lo : lo + _PAIR_CHUNK]
                similarity = (signatures[a] == signatures[b]).mean(axis=1)
                passed = similarity >= threshold
                found_a.append(a[passed])
                found_b.append(b[passed])
                found_sim.append(similarity[passed])
    if not found_a:
        return empty, empty, np.zeros(0)
    a, b, similarity = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_sim)
    # each pair once; then by the later document's rank, its most similar partner first, ties by rank
    visit = np.lexsort((rank[a], -similarity, rank[b]))
    kept = np.ones(num_docs, dtype=bool)
    dropped, partner, partner_sim = [], [], []
    for i, j, s in zip(a[visit].tolist(), b[visit].tolist(), similarity[visit].tolist(), strict=True):
        if kept[j] and kept[i]:  # i ranks before j, so whether i was kept is already settled
            kept[j] = False
            dropped.append(j)
            partner.append(i)
            partner_sim.append(s)
    return np.array(dropped, np.int64), np.array(partner, np.int64), np.array(partner_sim)
