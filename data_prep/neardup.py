"""Near-duplicate detection for the shard stage: MinHash signatures (rensa) and a global LSH pass over them.

A document becomes a set of shingles: runs of ``SHINGLE_SIZE`` consecutive *units*, where a unit is one
CJK character (Chinese and Japanese are written without spaces, so characters are their shingle units) or
one run of other letters and digits (a word). Case and punctuation are ignored. So English text gets
5-word shingles, Chinese 5-character shingles, and mixed text a mix. The set's MinHash signature
(``NUM_PERM`` 32-bit values, 512 bytes) estimates the Jaccard similarity of two documents as the share of
equal values. Shingles are never built as strings: numpy hashes a whole batch of documents' units at once
and combines each run of unit hashes into a 64-bit shingle hash, which rensa turns into signatures.

``find_near_duplicates`` cuts every signature into LSH bands; two documents that agree on a whole band
are candidates and are kept as a pair when their estimated Jaccard reaches the threshold. Documents are
visited in ``rank`` order (the shard stage ranks by content digest) and one is dropped when it pairs with
an earlier document that was kept, so which copy survives is a pure function of content, and every dropped
document names a kept one it is similar to (A~B and B~C with A≁C drops B only). It holds every signature
in memory; the stage runs ``find_near_duplicates_on_disk``, the same pass with the signatures on disk and
one band's keys, cut by key into parts, in memory at a time (same survivors, flat memory).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import rensa

from data_prep.cjk import CJK_WORD_CHARS

SHINGLE_SIZE = 5  # units per shingle: 5 words / 5 CJK characters, as in the usual web-corpus dedup recipes
NUM_PERM = 128  # signature values: ±0.035 standard error on a Jaccard of 0.8, 512 bytes per document
MINHASH_SEED = 1  # fixed: signatures must agree across processes and runs
_CJK = CJK_WORD_CHARS.pattern[1:-1]  # ideographs and kana: the characters the stage counts as words
_UNITS = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_NON_UNIT = re.compile(r"\W+")
_CJK_CHAR = re.compile(f"[{_CJK}]")
# byte -> byte: ASCII letters lower-cased, digits and "_" kept, other ASCII a space (the units' separator);
# bytes of non-ASCII characters kept (such documents are normalised by the regexes first)
_ASCII_UNITS = np.full(256, 0x20, np.uint8)
_ASCII_UNITS[128:] = np.arange(128, 256)
_ASCII_UNITS[list(b"abcdefghijklmnopqrstuvwxyz0123456789_")] = list(b"abcdefghijklmnopqrstuvwxyz0123456789_")
_ASCII_UNITS[list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")] = list(b"abcdefghijklmnopqrstuvwxyz")
_HASH_BASE = 0x100000001B3  # odd, so invertible mod 2^64: a unit's hash can be read off prefix sums
_SHINGLE_MULTIPLIER = 0x9E3779B97F4A7C15
SHINGLE_HASH_VERSION = 1  # bump when the unit or shingle hash changes: signatures change with it
_PIECE_BYTES = 1 << 18  # a longer document is hashed in pieces of about this many bytes
_BATCH_BYTES = 1 << 19  # bytes of text hashed per numpy step: ~16 bytes of temporaries per byte
_PAIR_CHUNK = 1 << 20  # candidate pairs compared per numpy step (bounds the temporary at ~0.5 GB)
# the on-disk pass: its files, what it sorts in memory at a time, how many candidates it reads at a time
_SIGNATURES, _DIGESTS = "signatures.u32", "digests.u64"
_ENTRY = np.dtype([("key", "<u8"), ("high", "<u8"), ("low", "<u8"), ("row", "<u8")])
_PARTITION_ROWS = 1 << 20  # one band's entries sorted at a time: 32 MB, ~0.15 GB with the sort's copies
_VERIFY_PAIRS = 1 << 15  # candidate pairs verified at a time: at most 32 MB of signatures read
_PAIR = np.dtype(
    [("b_high", "<u8"), ("b_low", "<u8"), ("a_high", "<u8"), ("a_low", "<u8"), ("a", "<u8"), ("b", "<u8")]
    + [("similarity", "<f8")]
)


def method() -> str:
    """What decides the signatures: recorded in the stage fingerprint, so a change re-runs the stage."""
    return (
        f"rensa {version('rensa')} RMinHash v{rensa.RMinHash.ALGORITHM_VERSION}, {NUM_PERM} perm, "
        f"seed {MINHASH_SEED}, {SHINGLE_SIZE}-unit shingles hashed by numpy v{SHINGLE_HASH_VERSION}"
    )


def units(text: str) -> list[str]:
    """The shingle units of ``text``: single CJK characters and lower-cased words; punctuation dropped."""
    return _UNITS.findall(text.lower())


def shingles(sentences: list[str], size: int = SHINGLE_SIZE) -> list[str]:
    """The document's shingles (``size`` consecutive units, across sentence ends), as strings: the set the
    signature estimates (``signatures`` hashes the same units without building these strings)."""
    words = [word for sentence in sentences for word in units(sentence)]
    return [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]


def _unit_bytes(sentences: list[str]) -> bytes:
    """The document as UTF-8 whose non-space runs, after ``_ASCII_UNITS``, are exactly ``units()``."""
    text = " ".join(sentences)
    if text.isascii():  # the common case: lower-casing and punctuation are left to one table look-up
        return text.encode()
    text = _NON_UNIT.sub(" ", text.lower())
    if _CJK_CHAR.search(text):
        text = _CJK_CHAR.sub(r" \g<0> ", text)  # every CJK character its own unit
    return text.encode()


def _pieces(encoded: bytes, size: int = SHINGLE_SIZE) -> list[bytes]:
    """``encoded`` cut at unit boundaries into pieces of about ``_PIECE_BYTES``, each repeating the previous
    piece's last ``size - 1`` units, so the pieces' shingles are the document's: a 50 MB one-line "document"
    is hashed in bounded memory."""
    if len(encoded) <= _PIECE_BYTES:
        return [encoded]
    text = bytes(_ASCII_UNITS[np.frombuffer(encoded, np.uint8)])  # separators as spaces, as hashed
    pieces, start = [], 0
    while len(text) - start > _PIECE_BYTES:
        cut = text.rfind(b" ", start + 1, start + _PIECE_BYTES)
        if cut < 0:  # one unit longer than a piece: cut after it
            cut = text.find(b" ", start + _PIECE_BYTES)
            if cut < 0:
                break
        pieces.append(text[start:cut])
        back = cut
        for _ in range(size - 1):  # back over size - 1 units (and the spaces between them)
            while back > start and text[back - 1] == 0x20:
                back -= 1
            back = max(text.rfind(b" ", start, back) + 1, start)
        # a piece of fewer than size units (units of ~50 kB): its few shingles across the cut are lost
        start = back if back > start else cut
    pieces.append(text[start:])
    return pieces


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (in place; returns ``x``)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@functools.lru_cache(maxsize=1)
def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^i, B^-i) mod 2^64 for i < ``length``: the polynomial unit hash's weights and their inverses."""
    base = np.full(length, _HASH_BASE, np.uint64)
    inverse = np.full(length, pow(_HASH_BASE, -1, 1 << 64), np.uint64)
    base[0] = inverse[0] = 1
    return np.cumprod(base), np.cumprod(inverse)  # uint64 products wrap: arithmetic mod 2^64


def shingle_hashes(pieces: list[bytes], size: int = SHINGLE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every shingle of every piece, in order; each piece's number of shingles).

    Vectorised over all pieces at once: a unit's hash is a polynomial over its bytes read off prefix sums
    (so it does not depend on where the unit sits), mixed; a shingle's hash combines its ``size`` unit hashes.
    """
    blob = _ASCII_UNITS[np.frombuffer(b" ".join(pieces) + b" ", np.uint8)]
    is_space = blob == 0x20
    weights, inverses = _powers(max(_BATCH_BYTES + _PIECE_BYTES, len(blob)) + 1)
    prefix = np.zeros(len(blob) + 1, np.uint64)
    np.cumsum(blob * weights[: len(blob)], out=prefix[1:])
    edges = np.flatnonzero(is_space[1:] != is_space[:-1]) + 1  # unit starts and ends, alternating
    if len(blob) and not is_space[0]:
        edges = np.concatenate([[0], edges])
    starts, ends = edges[0::2], edges[1::2]  # the blob ends with a space: every unit ends
    unit = _mix((prefix[ends] - prefix[starts]) * inverses[starts])
    piece_ends = np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)) + 1)
    # pieces are joined by a space, so no unit spans two: count each piece's units, then repeat its number
    units_before = np.searchsorted(starts, piece_ends)
    piece = np.repeat(np.arange(len(pieces)), np.diff(units_before, prepend=0))
    count = len(unit) - size + 1
    if count <= 0:
        return np.zeros(0, np.uint64), np.zeros(len(pieces), np.int64)
    hashes = unit[:count].copy()
    for j in range(1, size):  # a polynomial over the units: order matters, as in the shingle's string
        hashes *= np.uint64(_SHINGLE_MULTIPLIER)
        hashes += unit[j : count + j]
    inside = piece[size - 1 :] == piece[:count]  # the shingle's units all come from one piece
    return _mix(hashes[inside]), np.bincount(piece[:count][inside], minlength=len(pieces))


def _sign_pieces(pieces: list[bytes], owners: list[int], rows: dict[int, np.ndarray]) -> None:
    """MinHash every piece (rensa, over the shingle hashes) and fold each into its document's row: the
    signature of a union is the element-wise minimum of the parts' signatures."""
    hashes, counts = shingle_hashes(pieces)
    offsets = np.zeros(len(pieces) + 1, np.uint64)
    np.cumsum(counts, out=offsets[1:])
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, NUM_PERM, MINHASH_SEED)
    flat = np.fromiter(itertools.chain.from_iterable(matrix.to_rows()), np.uint32, len(pieces) * NUM_PERM)
    for owner, count, row in zip(owners, counts.tolist(), flat.reshape(-1, NUM_PERM), strict=True):
        if count:
            rows[owner] = np.minimum(rows[owner], row) if owner in rows else row


def signatures(documents: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(signatures ``(n, NUM_PERM)`` uint32 of the documents long enough to have a shingle, their indices).

    Documents shorter than one shingle get none: too short to call a near-duplicate (exact copies are
    still removed by the content digest). A document's signature does not depend on the others signed with it.
    """
    rows: dict[int, np.ndarray] = {}
    pieces: list[bytes] = []
    owners: list[int] = []
    batch_bytes = 0
    for i, sentences in enumerate(documents):
        for piece in _pieces(_unit_bytes(sentences)):
            pieces.append(piece)
            owners.append(i)
            batch_bytes += len(piece) + 1  # and its separator
            if batch_bytes >= _BATCH_BYTES:
                _sign_pieces(pieces, owners, rows)
                pieces, owners, batch_bytes = [], [], 0
    if pieces:
        _sign_pieces(pieces, owners, rows)
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


def find_near_duplicates_on_disk(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float, work_dir: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``find_near_duplicates`` with the signatures on disk and one LSH band in memory at a time, in pieces:
    (dropped digests, kept digests, similarity), digests ``(k, 2)`` uint64 (high, low word), by dropped digest.

    ``batches``: (digests ``(n, 2)`` uint64, signatures ``(n, NUM_PERM)`` uint32) of every document. The digest
    is the rank (the smaller is visited first) and copies with one digest count once, so the survivors are
    those of ``find_near_duplicates`` over the distinct documents ranked by digest. Memory: ~0.2 GB whatever
    the corpus, plus 56 bytes per near-duplicate pair found; disk: ~670 bytes per document, in ``work_dir``
    (created, and removed at the end).
    """
    bands, rows = lsh_bands(threshold, NUM_PERM)
    work_dir.mkdir(parents=True)
    try:
        num_docs = _write_columns(batches, work_dir, bands, rows)
        num_parts = max(1, -(-num_docs // _PARTITION_ROWS))
        found = np.zeros(0, _PAIR)
        for band in range(bands):
            for part in _partition(work_dir, band, num_docs, num_parts):
                pairs = _verified_pairs(np.fromfile(part, _ENTRY), work_dir / _SIGNATURES, threshold)
                part.unlink()
                found = np.unique(np.concatenate([found, pairs]))  # a pair found in many bands: kept once
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    # the same visit as find_near_duplicates: by the later document's rank, its most similar partner first
    visit = np.lexsort(
        (found["a_low"], found["a_high"], -found["similarity"], found["b_low"], found["b_high"])
    )
    dropped_rows: set[int] = set()
    chosen = []
    for i, a, b in zip(visit.tolist(), found["a"][visit].tolist(), found["b"][visit].tolist(), strict=True):
        if b not in dropped_rows and a not in dropped_rows:  # a ranks before b: its fate is already settled
            dropped_rows.add(b)
            chosen.append(i)
    pairs = found[np.array(chosen, np.int64)]
    dropped = np.stack([pairs["b_high"], pairs["b_low"]], axis=1)
    kept = np.stack([pairs["a_high"], pairs["a_low"]], axis=1)
    return dropped, kept, pairs["similarity"].copy()


def _write_columns(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], work_dir: Path, bands: int, rows: int
) -> int:
    """Streams the batches into ``work_dir``: signatures (row-major), digests, each band's keys; returns the
    number of documents. A document's row in these files is its place in the stream."""
    num_docs = 0
    with contextlib.ExitStack() as stack:
        signatures_out = stack.enter_context(open(work_dir / _SIGNATURES, "wb"))
        digests_out = stack.enter_context(open(work_dir / _DIGESTS, "wb"))
        keys_out = [stack.enter_context(open(work_dir / f"keys-{band}.u64", "wb")) for band in range(bands)]
        for digests, signatures in batches:
            assert digests.shape == (len(signatures), 2) and signatures.shape[1:] == (NUM_PERM,)
            np.ascontiguousarray(signatures, np.uint32).tofile(signatures_out)
            np.ascontiguousarray(digests, np.uint64).tofile(digests_out)
            for band, out in enumerate(keys_out):
                _band_keys(signatures, band, rows).tofile(out)
            num_docs += len(digests)
    return num_docs


def _partition(work_dir: Path, band: int, num_docs: int, num_parts: int) -> list[Path]:
    """One band's entries (key, digest, row) in ``num_parts`` files by key: a bucket lies in one file."""
    paths = [work_dir / f"band-{band}-part-{part}.bin" for part in range(num_parts)]
    keys_path = work_dir / f"keys-{band}.u64"
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(open(path, "wb")) for path in paths]
        keys_in = stack.enter_context(open(keys_path, "rb"))
        digests_in = stack.enter_context(open(work_dir / _DIGESTS, "rb"))
        for start in range(0, num_docs, _PARTITION_ROWS):
            count = min(_PARTITION_ROWS, num_docs - start)
            entries = np.empty(count, _ENTRY)
            entries["key"] = np.fromfile(keys_in, np.uint64, count)
            digests = np.fromfile(digests_in, np.uint64, 2 * count).reshape(count, 2)
            entries["high"], entries["low"] = digests[:, 0], digests[:, 1]
            entries["row"] = np.arange(start, start + count, dtype=np.uint64)
            part = (entries["key"] % np.uint64(num_parts)).astype(np.int64)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(num_parts + 1))
            entries = entries[order]
            for number, out in enumerate(outs):
                entries[bounds[number] : bounds[number + 1]].tofile(out)
    keys_path.unlink()
    return paths


def _verified_pairs(entries: np.ndarray, signatures_path: Path, threshold: float) -> np.ndarray:
    """The candidate pairs of one band's entries (as in ``find_near_duplicates``) whose signatures agree on
    at least ``threshold`` of their values."""
    entries = entries[np.lexsort((entries["row"], entries["low"], entries["high"], entries["key"]))]
    key = entries["key"]
    # exact copies share every band's key: keep the first (smallest row) of each digest, the same in every band
    copy = np.zeros(len(entries), dtype=bool)
    copy[1:] = (key[1:] == key[:-1]) & (entries["high"][1:] == entries["high"][:-1])
    copy[1:] &= entries["low"][1:] == entries["low"][:-1]
    entries = entries[~copy]
    key = entries["key"]
    follows = np.flatnonzero(key[1:] == key[:-1]) + 1  # positions not first in a bucket
    if not len(follows):
        return np.zeros(0, _PAIR)
    starts = np.zeros(len(entries), dtype=np.int64)
    starts[1:] = np.where(key[1:] != key[:-1], np.arange(1, len(entries)), 0)
    first = np.maximum.accumulate(starts)  # the position where each position's bucket begins
    other = follows[first[follows] != follows - 1]  # those whose predecessor is not their bucket's first
    found = []
    for earlier, later in ((first[follows], follows), (other - 1, other)):
        a, b = entries[earlier], entries[later]
        pairs = np.empty(len(later), _PAIR)
        pairs["a"], pairs["a_high"], pairs["a_low"] = a["row"], a["high"], a["low"]
        pairs["b"], pairs["b_high"], pairs["b_low"] = b["row"], b["high"], b["low"]
        pairs["similarity"] = _similarity(signatures_path, a["row"], b["row"])
        found.append(pairs[pairs["similarity"] >= threshold])
    return np.concatenate(found)


def _similarity(path: Path, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The share of equal values of the signatures in rows ``a`` and ``b`` of the file at ``path``."""
    similarity = np.empty(len(a))
    width = NUM_PERM * 4
    with open(path, "rb", buffering=0) as file:
        for lo in range(0, len(a), _VERIFY_PAIRS):
            rows_a, rows_b = a[lo : lo + _VERIFY_PAIRS], b[lo : lo + _VERIFY_PAIRS]
            rows, inverse = np.unique(np.concatenate([rows_a, rows_b]), return_inverse=True)
            # one read per row: a memory map would count whole cached folios of the file as this process's
            data = b"".join([os.pread(file.fileno(), width, row * width) for row in rows.tolist()])
            signatures = np.frombuffer(data, np.uint32).reshape(-1, NUM_PERM)
            index_a, index_b = inverse[: len(rows_a)], inverse[len(rows_a) :]
            similarity[lo : lo + _VERIFY_PAIRS] = (signatures[index_a] == signatures[index_b]).mean(axis=1)
    return similarity
