"""Memory and speed of the trainer's random access to example shards (bert.pretrain.data.ExampleShards).

Writes one synthetic examples directory of about --mib MiB per Arrow IPC layout (``stream``: what the examples
stage writes; ``file``: the older layout, still read), then, in a fresh subprocess per layout, measures the
resident memory (RSS) before and after opening the shards (a zero-copy memory map adds next to nothing, not
the file size), the time to open them and --lookups random ``shards[i]`` (median of --repeats), and the same
for ``datasets.Dataset.from_file``. Prints one JSON object.

    .venv/bin/python benchmarks/example_shards.py [--mib 500] [--lookups 10000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.manifest import begin_stage, file_entry  # noqa: E402
from data_prep.schema import ExampleMetadata, example_schema  # noqa: E402

ROWS_PER_BATCH = 4096  # the examples stage's default batch_size (examples per record batch)
# ids (uint16) and token types (uint8) of 74 tokens on average, 11 predictions (positions and ids, uint16),
# the four lists' int32 offsets and the scalars (int8 + two int64)
BYTES_PER_ROW = 74 * 3 + 11 * 4 + 4 * 4 + 17


def _list(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _batch(rng: np.random.Generator, rows: int, schema: pa.Schema) -> pa.RecordBatch:
    lengths = rng.integers(20, 129, rows)
    num_predictions = np.maximum(lengths * 15 // 100, 1)
    tokens, predictions = int(lengths.sum()), int(num_predictions.sum())
    columns = [
        _list(lengths, rng.integers(5, 30000, tokens, dtype=np.uint16)),
        _list(lengths, rng.integers(0, 2, tokens, dtype=np.uint8)),
        pa.array(rng.integers(0, 2, rows, dtype=np.int8)),
        _list(num_predictions, rng.integers(1, 128, predictions, dtype=np.uint16)),
        _list(num_predictions, rng.integers(5, 30000, predictions, dtype=np.uint16)),
        pa.array(rng.integers(0, 1 << 40, rows)),
        pa.array(rng.integers(0, 1 << 40, rows)),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def write_examples(directory: Path, layout: str, mib: int, num_files: int = 4) -> int:
    """A finished examples directory of about ``mib`` MiB in ``num_files`` train files; returns its rows."""
    metadata = ExampleMetadata(
        vocab_fingerprint="0" * 64,
        vocab_size=30522,
        special_ids={"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103},
        max_seq_length=128,
        masking="static",
        masked_lm_prob=0.15,
        max_predictions_per_seq=20,
        whole_word_mask=False,
        seed=0,
    )
    schema = example_schema(metadata)
    stage = begin_stage(directory, "examples", {"benchmark": layout}, {}, 1)
    stage.path("train").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    batches_per_file = max(1, mib * 2**20 // (BYTES_PER_ROW * ROWS_PER_BATCH * num_files))
    files, rows = [], 0
    new_writer = pa.ipc.new_stream if layout == "stream" else pa.ipc.new_file
    for k in range(num_files):
        relpath = f"train/part-{k:05d}.arrow"
        with pa.OSFile(str(stage.path(relpath)), "wb") as sink, new_writer(sink, schema) as writer:
            for _ in range(batches_per_file):
                writer.write_batch(_batch(rng, ROWS_PER_BATCH, schema))
                rows += ROWS_PER_BATCH
        files.append(file_entry(directory, relpath, sha256=False))
    stage.commit(files, {"examples": rows})
    return rows


MEASURE = r"""
import json, statistics, sys, time
import numpy as np
directory, lookups, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from bert.pretrain.data import open_split
import datasets
# Resident MiB: anonymous (copies, heap) and file-backed (pages of the memory maps that were touched).
def rss():
    values = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Rss"))
    return {k: int(v.split()[0]) / 1024 for k, v in values.items()}
def growth(now, then):
    return {"anon": round(now["RssAnon"] - then["RssAnon"], 1), "file": round(now["RssFile"] - then["RssFile"], 1)}
before = rss()
started = time.perf_counter()
shards = open_split(directory, "train")
open_s = time.perf_counter() - started
after_open = rss()
indices = np.random.default_rng(1).integers(0, len(shards), lookups).tolist()
times = []
for _ in range(repeats):
    started = time.perf_counter()
    for i in indices:
        shards[i]
    times.append(time.perf_counter() - started)
after_lookups = rss()
files = sorted(str(p) for p in shards.paths)
started = time.perf_counter()
try:
    parts = [datasets.Dataset.from_file(f) for f in files]
    hf = {"hf_from_file_open_s": round(time.perf_counter() - started, 4),
          "hf_rss_growth_mib": growth(rss(), after_lookups), "hf_rows": sum(len(p) for p in parts)}
except Exception as e:  # the older file layout: datasets reads only the stream layout
    hf = {"hf_from_file_error": f"{type(e).__name__}: {e}"[:200]}
print(json.dumps({
    "rows": len(shards),
    "rss_before_mib": {k: round(v, 1) for k, v in before.items()},
    "rss_growth_open_mib": growth(after_open, before),
    "rss_growth_after_lookups_mib": growth(after_lookups, before),
    "open_s": round(open_s, 4),
    "lookups": lookups,
    "lookups_s_median": round(statistics.median(times), 4),
    "us_per_lookup": round(statistics.median(times) / lookups * 1e6, 2),
    **hf,
}))
"""


def measure(directory: Path, lookups: int, repeats: int) -> dict:
    """Open and look up in a fresh interpreter, so that writing the files does not count in its RSS."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(directory), str(lookups), str(repeats)],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=500, help="size of each synthetic examples directory")
    parser.add_argument("--lookups", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default="stream,file", help="comma-separated: stream, file")
    parser.add_argument(
        "--work", type=Path, default=None, help="where to write (default: a temporary directory)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bertpipe-shards-")) if args.work is None else args.work
    results = {}
    try:
        for layout in args.layouts.split(","):
            directory = work / layout
            started = time.perf_counter()
            write_examples(directory, layout, args.mib)
            write_s = time.perf_counter() - started
            size = sum(p.stat().st_size for p in (directory / "train").glob("*.arrow"))
            figures = measure(directory, args.lookups, args.repeats)
            results[layout] = {
                "file_mib": round(size / 2**20, 1),
                "write_s": round(write_s, 1),
                **figures,
            }
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["median_of"] = args.repeats
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
