"""Pretraining throughput on the CPU: non-padding tokens/s per rank for 1 and 2 ranks, and time to an MLM loss.

Builds a small corpus → vocab → examples chain from the sample data (or takes --examples/--vocab), then runs
`bertpipe pretrain` through the deepspeed launcher with the same per-rank micro batch on 1 and 2 ranks.
Prints one JSON object. Not a test: figures on a shared 2-core machine are noisy; quote medians.

    python benchmarks/pretrain_throughput.py [--steps 40] [--target-mlm-loss 7.0] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BERTPIPE_SHARED", REPO.parent / "shared"))
BERTPIPE = str(Path(sys.executable).parent / "bertpipe")


def run(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [BERTPIPE, *args], check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return time.perf_counter() - started


def build_stages(work: Path, max_seq_length: int) -> tuple[Path, Path]:
    corpus, vocab, examples = work / "corpus", work / "vocab", work / "examples"
    run("shard", "--input", str(SHARED / "data/corpus/inaugural"), "--out", str(corpus), "--num-shards", "2",
        "--doc-boundary", "file")  # fmt: skip
    run("vocab", "--corpus", str(corpus), "--out", str(vocab), "--vocab-size", "4000")
    run("examples", "--corpus", str(corpus), "--vocab", str(vocab), "--out", str(examples),
        "--max-seq-length", str(max_seq_length), "--masking", "dynamic")  # fmt: skip
    return examples, vocab


def pretrain(examples: Path, vocab: Path, out: Path, ranks: int, steps: int, micro: int) -> list[dict]:
    wall = run("pretrain", "--examples", str(examples), "--vocab", str(vocab), "--out", str(out),
               "--model-config", "tiny", "--deepspeed-config", str(REPO / "deepspeed_configs/zero2_fp32.json"),
               "--num-gpus", str(ranks), "--micro-batch-size", str(micro), "--max-steps", str(steps),
               "--lr", "5e-3", "--warmup-steps", str(steps // 10), "--no-progress")  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    train[-1]["whole_process_s"] = wall
    return train


def summarise(records: list[dict], ranks: int, target: float) -> dict:
    steady = records[3:] or records  # the first steps pay for warm-up
    elapsed, reached = 0.0, None
    for i, r in enumerate(records):
        elapsed += r["step_time_s"]
        window = [x["mlm_loss"] for x in records[max(0, i - 4) : i + 1]]
        if reached is None and len(window) == 5 and statistics.mean(window) <= target:
            reached = {"step": r["step"], "train_seconds": round(elapsed, 2)}
    return {
        "ranks": ranks,
        "steps": len(records),
        "non_padding_tokens_per_s_per_rank": round(
            statistics.median(r["tokens_per_s_per_rank"] for r in steady), 1
        ),
        "non_padding_tokens_per_s_total": round(statistics.median(r["tokens_per_s"] for r in steady), 1),
        "samples_per_s": round(statistics.median(r["samples_per_s"] for r in steady), 2),
        "first_mlm_loss": round(records[0]["mlm_loss"], 3),
        "last_mlm_loss_mean5": round(statistics.mean(r["mlm_loss"] for r in records[-5:]), 3),
        "time_to_target_mlm_loss": reached,
        "whole_process_s": round(records[-1]["whole_process_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path)
    parser.add_argument("--vocab", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--target-mlm-loss", type=float, default=7.0)
    parser.add_argument("--ranks", default="1,2")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bertpipe-bench-"))
    if args.examples is None:
        args.examples, args.vocab = build_stages(work, args.max_seq_length)
    results = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        out = work / f"run-{ranks}"
        records = pretrain(args.examples, args.vocab, out, ranks, args.steps, args.micro_batch_size)
        results.append(summarise(records, ranks, args.target_mlm_loss))
    print(json.dumps({
        "benchmark": "pretrain_throughput", "model": "tiny (2 layers, hidden 128)", "zero": 2, "precision": "fp32",
        "micro_batch_size_per_rank": args.micro_batch_size, "max_seq_length": args.max_seq_length,
        "target_mlm_loss": args.target_mlm_loss, "cpu_count": os.cpu_count(), "runs": results,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
