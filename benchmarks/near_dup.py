"""Near-duplicate detection: rensa against datasketch on synthetic documents with planted near-duplicates.

Documents of 8 paragraphs (~300 words) are drawn from a Zipf-like 30k-word vocabulary; a share of them are
edited copies of another document (a few words replaced, or one paragraph dropped). Each library runs in a
fresh process (so peak RSS is its own) over the same documents, shingled the way the shard stage shingles
(``data_prep.neardup.shingles``), and reports for:
- ``signatures``: MinHash signatures of every document (128 permutations), documents/s;
- ``library_lsh``: the library's own LSH index at the threshold (insert all, query all, keep candidates whose
  estimated Jaccard passes), documents/s;
- ``stage_lsh``: the shard stage's global pass (``data_prep.neardup.find_near_duplicates``) over the
  library's signatures, documents/s;
with recall (planted copies found) and precision (dropped documents that are planted copies) of both LSH
steps, and the process's peak RSS after generating the documents and at the end (the end includes every
document's shingle strings, ~2.6 GB at 100k documents, which the benchmark keeps for both LSH steps; the
stage shingles 1,024 documents at a time). Prints one JSON object.

    python benchmarks/near_dup.py [--num-docs 100000] [--planted 0.05] [--threshold 0.8] [--library both]

``--stage`` measures the shard stage itself instead: the same documents written as JSONL, then `bertpipe shard`
with near-duplicate removal and without (each a fresh process: wall time, documents/s, peak RSS of the stage's
processes, documents dropped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
        "peak_rss_mb": {"after_generation": round(after_generation), "end": round(peak_rss_mb())},
    }


def run_stage(args) -> dict:
    """`bertpipe shard` on the synthetic corpus with and without near-duplicate removal."""
    import os
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
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args), indent=2))
        return
    if args.child:
        print(json.dumps(run_library(args.library, args.num_docs, args.planted, args.threshold, args.seed)))
        return
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
        results.append(
            json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout)
        )
    print(
        json.dumps({"threshold": args.threshold, "num_perm": neardup.NUM_PERM, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
