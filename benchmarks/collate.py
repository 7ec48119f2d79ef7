"""Collation time per batch: the vectorised ``bert.pretrain.data.Collator`` against the per-row collator it
replaced (``per_row_collate`` in tests/test_collate.py, kept there as the reference).

Builds a small examples directory with the data stages (shard → vocab → examples, as the demo pipeline:
``max_seq_length`` 128, vocabulary 8000, on the inaugural speeches of the sample corpus), once per masking
setup (the demo's static masking; dynamic; dynamic whole-word), then collates the same random batches of
--batch-size examples (the demo's micro batch: 32) both ways, checks they are equal, and prints one JSON
object: the median milliseconds per batch, old and new, per setup.

    BERTPIPE_SHARED=/work/shared .venv/bin/python benchmarks/collate.py [--batches 200] [--work DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_collate import per_row_collate  # noqa: E402

from bert.pretrain.data import Collator, ExampleShards, open_split  # noqa: E402
from data_prep.examples_stage import ExamplesConfig, generate_examples  # noqa: E402
from data_prep.shard import ShardConfig, shard_corpus  # noqa: E402
from data_prep.vocab import VocabConfig, load_vocab, train_vocab  # noqa: E402

SETUPS = {  # name: (masking, whole_word_mask)
    "static (demo)": ("static", False),
    "dynamic": ("dynamic", False),
    "dynamic whole-word": ("dynamic", True),
}


def build_examples(work: Path, corpus: Path) -> dict[str, Path]:
    """One examples directory per setup, from the same shards and vocabulary (reused when already there)."""
    if not (work / "corpus/manifest.json").exists():
        speeches = sorted(str(p) for p in (corpus / "inaugural").glob("*.txt"))
        shard_corpus(ShardConfig(inputs=speeches, out=str(work / "corpus"), num_shards=2, doc_boundary="file",
                                 valid_fraction=0.05, seed=0))  # fmt: skip
    if not (work / "vocab/manifest.json").exists():
        train_vocab(VocabConfig(corpus=work / "corpus", out=work / "vocab", vocab_size=8000))
    directories = {}
    for name, (masking, whole_word) in SETUPS.items():
        out = work / f"examples-{masking}{'-wwm' if whole_word else ''}"
        if not (out / "manifest.json").exists():
            generate_examples(ExamplesConfig(corpus=work / "corpus", vocab=work / "vocab", out=out,
                                             max_seq_length=128, masking=masking, whole_word_mask=whole_word,
                                             dupe_factor=2, seed=12345))  # fmt: skip
        directories[name] = out
    return directories


def median_ms(collate, shards: ExampleShards, batches: list[np.ndarray]) -> float:
    """Median milliseconds of ``collate(shards, indices, epoch)`` over ``batches``."""
    times = []
    for epoch, indices in enumerate(batches):
        t0 = time.perf_counter()
        collate(shards, indices, epoch % 3)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=200, help="random batches timed per setup and collator"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="examples per batch (the demo's micro batch)"
    )
    parser.add_argument(
        "--work", type=Path, help="where to build the examples (kept; default: a temporary dir)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    shared = Path(os.environ.get("BERTPIPE_SHARED", REPO.parent / "shared"))
    work = args.work or Path(tempfile.mkdtemp(prefix="bertpipe-collate-"))
    directories = build_examples(work, shared / "data/corpus")
    tokens = load_vocab(work / "vocab").tokens
    results = {"batch_size": args.batch_size, "batches": args.batches, "work": str(work), "setups": {}}
    for name, directory in directories.items():
        shards = open_split(directory, "train")
        collator = Collator(shards.metadata, seed=0, pad_to_multiple_of=8, tokens=tokens)
        rng = np.random.default_rng(0)
        batches = [rng.choice(len(shards), args.batch_size, replace=False) for _ in range(args.batches)]
        for epoch, indices in enumerate(batches[:5]):  # the same batches both ways, before timing anything
            old, new = per_row_collate(collator, shards, indices, epoch), collator(shards, indices, epoch)
            assert all(torch.equal(old[k], new[k]) for k in old), f"{name}: the collators disagree"
        old_ms = median_ms(functools.partial(per_row_collate, collator), shards, batches)
        new_ms = median_ms(collator, shards, batches)
        results["setups"][name] = {
            "examples": len(shards),
            "mean_tokens_per_example": round(float(shards.lengths().mean()), 1),
            "old_median_ms": old_ms,
            "new_median_ms": new_ms,
            "speedup": round(old_ms / new_ms, 2),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
