"""Near-duplicate detection: rensa against datasketch on synthetic documents with planted near-duplicates,
the shard stage's own signing and on-disk pass, and the memory of that pass per document.

Documents of 8 paragraphs (~300 words) are drawn from a Zipf-like 30k-word vocabulary; a share of them are
edited copies of another document (a few words replaced, or one paragraph dropped). Each library runs in a
fresh process (so peak RSS is its own; rensa on one thread, ``RAYON_NUM_THREADS=1``) over the same documents,
shingled as strings (``data_prep.neardup.shingles``, the set the stage's hashes stand for), and reports for:
- ``signatures``: MinHash signatures of every document (128 permutations), documents/s;
- ``library_lsh``: the library's own LSH index at the threshold (insert all, query all, keep candidates whose
  estimated Jaccard passes), documents/s;
- ``stage_lsh``: the shard stage's in-memory reference pass (``data_prep.neardup.find_near_duplicates``) over
  the library's signatures, documents/s;
- ``stage``: what the shard stage runs: ``neardup.signatures`` on the sentence lists (shingling and hashing
  together, documents per CPU second: per core) and ``neardup.find_near_duplicates_on_disk``;
with recall (planted copies found) and precision (dropped documents that are planted copies) of each pass,
and the process's peak RSS after generating the documents and at the end (the end includes every
document's shingle strings, ~2.6 GB at 100k documents, which the benchmark keeps for the library passes;
the stage hashes ~0.5 MB of text at a time). Prints one JSON object (``--out``: also writes it there).

    python benchmarks/near_dup.py [--num-docs 100000] [--planted 0.05] [--threshold 0.8] [--library both]

``--memory N[,N...]`` measures the global pass alone, each run a fresh process over N synthetic signatures
(5% planted near-copies): the in-memory reference (the signatures held in one array, as the stage did)
against the on-disk pass (signatures streamed in batches): peak RSS, its growth over the process's RSS
before the pass, bytes per document, seconds.

``--stage`` measures the shard stage itself instead: the same documents written as JSONL, then `bertpipe shard`
with near-duplicate removal and without (each a fresh process: wall time, documents/s, peak RSS of the stage's
processes, documents dropped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep import neardup  # noqa: E402

LIBRARIES = ("rensa", "datasketch")
BATCH = 1024
IMPLEMENTATIONS = ("in_memory", "on_disk")  # of the global pass, for --memory
SIGNATURE_BATCH = 1 << 16  # synthetic signatures per batch of --memory's stream
ONE_THREAD = {**os.environ, "RAYON_NUM_THREADS": "1"}  # rensa's batch calls would use every core


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_corpus(num_docs: int, planted: float, seed: int) -> tuple[list[list[str]], dict[int, int]]:
    """(documents as sentence lists, {copy index: original index}) with ``planted`` of them edited copies."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(30_000)]
    weights = 1.0 / np.arange(1, len(vocabulary) + 1) ** 0.9
    weights /= weights.sum()
    words = rng.choice(len(vocabulary), size=num_docs * 320, p=weights)  # drawn at once: fast
    copies = rng.random(num_docs) < planted
    copies[0] = False
    documents, originals, cursor = [], {}, 0
    for i in range(num_docs):
        if copies[i]:
            original = int(rng.integers(0, i))
            while copies[original]:
                original = int(rng.integers(0, i))
            originals[i] = original
            paragraphs = [list(p) for p in documents[original]]
            if i % 2:  # a few words changed
                for _ in range(3):
                    p = int(rng.integers(len(paragraphs)))
                    paragraphs[p][int(rng.integers(len(paragraphs[p])))] = "edited"
            else:  # one paragraph dropped
                del paragraphs[int(rng.integers(len(paragraphs)))]
            documents.append(paragraphs)
            continue
        paragraphs = []
        for _ in range(8):
            length = int(rng.integers(30, 50))
            paragraphs.append([vocabulary[w] for w in words[cursor : cursor + length]])
            cursor += length
        documents.append(paragraphs)
    return [[" ".join(p) + "." for p in doc] for doc in documents], originals


def exact_jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(neardup.shingles(a)), set(neardup.shingles(b))
    return len(sa & sb) / len(sa | sb)


def score(dropped, kept, originals: dict[int, int]) -> dict:
    """Recall: planted copies whose pair was found; precision: dropped documents paired with their twin."""
    twin = {**originals, **{o: c for c, o in originals.items()}}
    found = {(min(d, k), max(d, k)) for d, k in zip(dropped, kept, strict=True)}
    planted = {(min(c, o), max(c, o)) for c, o in originals.items()}
    correct = sum(
        1 for d, k in zip(dropped, kept, strict=True) if twin.get(d) == k or originals.get(d) in (k,)
    )
    return {
        "dropped": len(dropped),
        "recall": round(len(found & planted) / max(len(planted), 1), 4),
        "precision": round(correct / max(len(dropped), 1), 4),
    }


def rensa_signatures(shingle_batches):
    import rensa

    blocks = []
    for batch in shingle_batches:
        matrix = rensa.RMinHash.digest_matrix_from_token_sets(batch, neardup.NUM_PERM, neardup.MINHASH_SEED)
        blocks.append(np.array(matrix.to_rows(), dtype=np.uint32))
    return np.concatenate(blocks)


def datasketch_signatures(shingle_batches):
    from datasketch import MinHash

    rows = []
    for batch in shingle_batches:
        for shingle_set in batch:
            m = MinHash(num_perm=neardup.NUM_PERM, seed=neardup.MINHASH_SEED)
            m.update_batch([s.encode() for s in shingle_set])
            rows.append(m.hashvalues.astype(np.uint32))  # 2.x: 32-bit values ("affine32")
    return np.stack(rows)


def library_pairs(library: str, signatures: np.ndarray, shingle_batches, threshold: float) -> list:
    """Candidate pairs from the library's own LSH index: insert every document, query every one."""
    if library == "datasketch":
        from datasketch import LeanMinHash, MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=neardup.NUM_PERM)
        sketches = [
            LeanMinHash(seed=neardup.MINHASH_SEED, hashvalues=row, scheme="affine32") for row in signatures
        ]
        for i, sketch in enumerate(sketches):
            lsh.insert(i, sketch, check_duplication=False)
        return [(i, j) for i, sketch in enumerate(sketches) for j in lsh.query(sketch) if j != i]
    import rensa

    # rensa's index takes RMinHash objects, which cannot be rebuilt from a signature: sketch again. Its bands
    # must divide num_perm: 16 bands of 8 rows (S-curve midpoint ~0.71) rather than 8 of 16 (~0.88, misses)
    lsh = rensa.RMinHashLSH(threshold, neardup.NUM_PERM, 16)
    sketches = [
        m
        for batch in shingle_batches
        for m in rensa.RMinHash.from_token_sets(batch, neardup.NUM_PERM, neardup.MINHASH_SEED)
    ]
    lsh.insert_many(sketches)
    return [(i, j) for i, found in enumerate(lsh.query_all(sketches)) for j in found if j != i]


def run_library(library: str, num_docs: int, planted: float, threshold: float, seed: int) -> dict:
    documents, originals = synthetic_corpus(num_docs, planted, seed)
    rank = np.argsort(np.argsort([hashlib.sha256("\n".join(d).encode()).digest() for d in documents]))
    after_generation = peak_rss_mb()
    start = time.perf_counter()
    shingle_batches = [
        [neardup.shingles(d) for d in documents[i : i + BATCH]] for i in range(0, num_docs, BATCH)
    ]
    shingling_s = time.perf_counter() - start

    start = time.perf_counter()
    if library == "rensa":
        signatures = rensa_signatures(shingle_batches)
    else:
        signatures = datasketch_signatures(shingle_batches)
    signatures_s = time.perf_counter() - start

    start = time.perf_counter()
    pairs = library_pairs(library, signatures, shingle_batches, threshold)
    # the same rule as the stage: a verified pair drops the later-ranked document if its partner was kept
    verified = sorted(
        {
            (min(i, j, key=rank.__getitem__), max(i, j, key=rank.__getitem__))
            for i, j in pairs
            if (signatures[i] == signatures[j]).mean() >= threshold
        },
        key=lambda p: (rank[p[1]], rank[p[0]]),
    )
    kept, lib_dropped, lib_kept = np.ones(num_docs, bool), [], []
    for i, j in verified:
        if kept[i] and kept[j]:
            kept[j] = False
            lib_dropped.append(j)
            lib_kept.append(i)
    library_lsh_s = time.perf_counter() - start

    start = time.perf_counter()
    dropped, partner, _ = neardup.find_near_duplicates(signatures, rank, threshold)
    stage_lsh_s = time.perf_counter() - start

    stage = run_stage_pass(documents, originals, rank, threshold)
    sample = list(originals.items())[:500]
    planted_jaccard = [exact_jaccard(documents[c], documents[o]) for c, o in sample]
    return {
        "library": library,
        "version": __import__("importlib.metadata").metadata.version(library),
        "documents": num_docs,
        "planted_copies": len(originals),
        "planted_exact_jaccard": {
            "min": round(min(planted_jaccard), 3),
            "mean": round(float(np.mean(planted_jaccard)), 3),
        },
        "shingling": {"seconds": round(shingling_s, 2), "docs_per_s": round(num_docs / shingling_s)},
        "signatures": {"seconds": round(signatures_s, 2), "docs_per_s": round(num_docs / signatures_s)},
        "library_lsh": {
            "seconds": round(library_lsh_s, 2),
            "docs_per_s": round(num_docs / library_lsh_s),
            **score(lib_dropped, lib_kept, originals),
        },
        "stage_lsh": {
            "seconds": round(stage_lsh_s, 2),
            "docs_per_s": round(num_docs / stage_lsh_s),
            **score(dropped.tolist(), partner.tolist(), originals),
        },
        "stage": stage,
        "peak_rss_mb": {"after_generation": round(after_generation), "end": round(peak_rss_mb())},
    }


def run_stage_pass(documents: list[list[str]], originals: dict[int, int], rank, threshold: float) -> dict:
    """The stage's signing (CPU seconds: per core) and on-disk pass over the documents, with recall."""
    import tempfile

    start, start_cpu = time.perf_counter(), time.process_time()
    signatures, signed = neardup.signatures(documents)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    digests = np.stack([np.zeros(len(signed), np.uint64), rank[signed].astype(np.uint64)], axis=1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="near-dup-") as tmp:
        batches = ((digests[i : i + BATCH], signatures[i : i + BATCH]) for i in range(0, len(signed), BATCH))
        dropped, kept, _ = neardup.find_near_duplicates_on_disk(batches, threshold, Path(tmp) / "work")
    lsh_seconds = time.perf_counter() - start
    row_of_rank = np.argsort(rank)
    dropped, kept = row_of_rank[dropped[:, 1].astype(np.int64)], row_of_rank[kept[:, 1].astype(np.int64)]
    return {
        "method": neardup.method(),
        "signatures": {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "docs_per_s": round(len(documents) / seconds),
            "docs_per_cpu_s": round(len(documents) / cpu_seconds),
        },
        "on_disk_lsh": {
            "seconds": round(lsh_seconds, 2),
            "docs_per_s": round(len(documents) / lsh_seconds),
            **score(dropped.tolist(), kept.tolist(), originals),
        },
    }


def synthetic_signatures(num_docs: int, seed: int, batch: int = SIGNATURE_BATCH):
    """(digests, signatures) batches of random signatures, 5% of them near-copies (~10% of values changed) of
    a row of the same batch: a stream, so the generator itself holds one batch."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_docs, batch):
        count = min(batch, num_docs - start)
        signatures = rng.integers(0, 2**32, (count, neardup.NUM_PERM), dtype=np.uint32)
        copies = np.flatnonzero(rng.random(count) < 0.05)
        signatures[copies] = signatures[rng.integers(0, count, len(copies))]
        changed = rng.random((len(copies), neardup.NUM_PERM)) < 0.1
        signatures[copies] = np.where(
            changed, rng.integers(0, 2**32, changed.shape, np.uint32), signatures[copies]
        )
        yield rng.integers(0, 2**63, (count, 2), dtype=np.uint64), signatures


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def run_memory(num_docs: int, implementation: str, threshold: float, seed: int) -> dict:
    """Peak RSS of one global pass over ``num_docs`` synthetic signatures, in this (fresh) process."""
    import tempfile

    before = current_rss_mb()
    start = time.perf_counter()
    if implementation == "in_memory":  # what the stage held: every signature, and a rank by digest
        digests = np.empty((num_docs, 2), np.uint64)
        signatures = np.empty((num_docs, neardup.NUM_PERM), np.uint32)
        for start_row, (d, s) in zip(
            range(0, num_docs, SIGNATURE_BATCH), synthetic_signatures(num_docs, seed), strict=True
        ):
            digests[start_row : start_row + len(d)], signatures[start_row : start_row + len(d)] = d, s
        rank = np.empty(num_docs, np.int64)
        rank[np.lexsort((digests[:, 1], digests[:, 0]))] = np.arange(num_docs)
        dropped, _, _ = neardup.find_near_duplicates(signatures, rank, threshold)
    else:
        with tempfile.TemporaryDirectory(prefix="near-dup-memory-") as tmp:
            dropped, _, _ = neardup.find_near_duplicates_on_disk(
                synthetic_signatures(num_docs, seed), threshold, Path(tmp) / "work"
            )
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "implementation": implementation,
        "documents": num_docs,
        "dropped": len(dropped),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak),
        "rss_before_mb": round(before),
        "bytes_per_document": round((peak - before) * 2**20 / num_docs),
    }


def run_stage(args) -> dict:
    """`bertpipe shard` on the synthetic corpus with and without near-duplicate removal."""
    import tempfile

    documents, originals = synthetic_corpus(args.num_docs, args.planted, args.seed)
    report: dict = {"documents": args.num_docs, "planted_copies": len(originals), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="near-dup-stage-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for i, sentences in enumerate(documents):
                f.write(json.dumps({"id": str(i), "text": "\n\n".join(sentences)}) + "\n")
        report["corpus_mb"] = round(corpus.stat().st_size / 2**20, 1)
        del documents
        bertpipe = Path(sys.executable).parent / "bertpipe"
        for name, flags in (("near_dup", []), ("exact_only", ["--no-near-dup"])):
            out = Path(tmp) / name
            command = [str(bertpipe), "shard", "--input", str(corpus), "--out", str(out), "--num-shards", "4",
                       "--workers", str(args.workers), *flags]  # fmt: skip
            script = (
                "import resource, subprocess, sys, time; t = time.perf_counter();"
                "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode;"
                "print(code, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True,
                                  check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
            code, seconds, max_rss_kib = done.stdout.split()
            stats = json.loads((out / "manifest.json").read_text())["stats"]
            report["runs"][name] = {
                "returncode": int(code),
                "seconds": round(float(seconds), 1),
                "docs_per_s": round(args.num_docs / float(seconds)),
                "peak_rss_mb_largest_process": round(int(max_rss_kib) / 1024),
                "dropped": stats.get("dropped"),
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-docs", type=int, default=100_000)
    parser.add_argument(
        "--planted", type=float, default=0.05, help="share of documents that are edited copies"
    )
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", choices=(*LIBRARIES, "both"), default="both")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", action="store_true", help="measure `bertpipe shard` itself (see above)")
    parser.add_argument("--workers", type=int, default=2, help="with --stage: the stage's --workers")
    parser.add_argument(
        "--memory", help="document counts, comma-separated: memory of the global pass (above)"
    )
    parser.add_argument("--implementation", choices=IMPLEMENTATIONS, help="with --memory: only this one")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.child:
        if args.memory:
            result = run_memory(args.num_docs, args.implementation, args.threshold, args.seed)
        else:
            result = run_library(args.library, args.num_docs, args.planted, args.threshold, args.seed)
        print(json.dumps(result))
        return
    if args.stage:
        report = run_stage(args)
    elif args.memory:
        report = {"threshold": args.threshold, "runs": []}
        for num_docs in (int(n) for n in args.memory.split(",")):
            for implementation in [args.implementation] if args.implementation else IMPLEMENTATIONS:
                command = [sys.executable, __file__, "--child", "--memory", str(num_docs), "--num-docs",
                           str(num_docs), "--implementation", implementation, "--threshold", str(args.threshold),
                           "--seed", str(args.seed)]  # fmt: skip
                done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=ONE_THREAD)
                report["runs"].append(json.loads(done.stdout))
    else:
        report = {"threshold": args.threshold, "num_perm": neardup.NUM_PERM, "results": run_libraries(args)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


def run_libraries(args) -> list[dict]:
    """Each library's run (``run_library``) in a fresh process."""
    results = []
    for library in LIBRARIES if args.library == "both" else (args.library,):
        command = [
            sys.executable,
            __file__,
            "--child",
            "--library",
            library,
            "--num-docs",
            str(args.num_docs),
            "--planted",
            str(args.planted),
            "--threshold",
            str(args.threshold),
            "--seed",
            str(args.seed),
        ]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=ONE_THREAD)
        results.append(json.loads(done.stdout))
    return results


if __name__ == "__main__":
    main()
