"""Every data stage is a pure function of its inputs and settings: three runs give the same bytes.

The shard, vocab and examples stages run three times each, every run reading the previous stage's output of
the same run, and every file they write is compared byte for byte. In manifest.json only the timings may
differ (when it was written, how long the stage took); every other field must match too. Pretraining and
fine-tuning (on the CPU) export the same weights and log the same metrics, timings aside.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reference
from test_vocab import WORDS

from data_prep.examples_stage import ExamplesConfig, generate_examples
from data_prep.manifest import MANIFEST
from data_prep.shard import ShardConfig, shard_corpus
from data_prep.vocab import VocabConfig, train_vocab

TIMINGS = {"created_at": None, "stats": {"seconds": None}}  # manifest fields that record when and how long


def without_timings(manifest: dict, timings: dict = TIMINGS) -> dict:
    """``manifest`` less the timing fields (nested as in TIMINGS)."""
    kept = {}
    for key, value in manifest.items():
        if key in timings and timings[key] is None:
            continue
        kept[key] = without_timings(value, timings[key]) if key in timings else value
    return kept


def stage_files(directory: Path) -> dict[str, bytes]:
    """Every file below a stage directory (hidden ones too: nothing may be left behind), manifest aside."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def assert_identical_runs(directories: list[Path]) -> None:
    first, *others = directories
    files = stage_files(first)
    manifest = without_timings(json.loads((first / MANIFEST).read_text()))
    assert files and manifest["files"]
    for other in others:
        assert stage_files(other).keys() == files.keys(), other
        for name, data in stage_files(other).items():
            assert data == files[name], f"{other / name} differs from {first / name}"
        assert without_timings(json.loads((other / MANIFEST).read_text())) == manifest, other


def run_three_times(tmp_path: Path, inputs: list[str], doc_boundary: str, workers: tuple[int, ...],
                    vocab_size: int) -> list[dict[str, Path]]:  # fmt: skip
    runs = []
    for run, num_workers in enumerate(workers):
        root = tmp_path / f"run{run}"
        shard_corpus(ShardConfig(inputs=inputs, out=root / "corpus", num_shards=2, doc_boundary=doc_boundary,
                                 valid_fraction=0.2, seed=3, workers=num_workers))  # fmt: skip
        train_vocab(VocabConfig(corpus=root / "corpus", out=root / "vocab", vocab_size=vocab_size))
        # Each run tokenises into its own cache, except the last, which reads the first run's.
        cache = tmp_path / ("run0" if run == len(workers) - 1 else f"run{run}") / "cache"
        generate_examples(ExamplesConfig(corpus=root / "corpus", vocab=root / "vocab", out=root / "examples",
                                         max_seq_length=48, dupe_factor=2, whole_word_mask=True, seed=7,
                                         workers=num_workers, cache_dir=cache))  # fmt: skip
        runs.append({stage: root / stage for stage in ("corpus", "vocab", "examples")})
    return runs


def test_three_runs_of_each_stage_give_identical_bytes_on_a_small_text(tmp_path):
    words = WORDS
    paragraphs = []
    for doc in range(40):
        sentences = [
            " ".join(words[(doc * 5 + s * 3 + k * k) % len(words)] for k in range(4 + s % 5)).capitalize()
            + "."
            for s in range(2 + doc % 6)
        ]
        paragraphs.append(" ".join(sentences))
    raw = tmp_path / "raw.txt"
    raw.write_text("\n\n".join(paragraphs) + "\n")
    runs = run_three_times(tmp_path, [str(raw)], "blank-line", workers=(1, 1, 1), vocab_size=200)
    for stage in ("corpus", "vocab", "examples"):
        assert_identical_runs([run[stage] for run in runs])


@pytest.mark.slow
def test_three_runs_of_each_stage_give_identical_bytes_on_the_sample_corpus(shared_data, tmp_path):
    speeches = sorted((shared_data / "corpus" / "inaugural").glob("*.txt"))[:8]
    runs = run_three_times(
        tmp_path, [str(p) for p in speeches], "blank-line", workers=(1, 2, 1), vocab_size=3000
    )
    for stage in ("corpus", "vocab", "examples"):
        assert_identical_runs([run[stage] for run in runs])
    examples = json.loads((runs[0]["examples"] / MANIFEST).read_text())
    assert examples["stats"]["examples"] > 500  # enough text for the comparison to mean something


def without_timing_keys(obj):
    """``obj`` (JSON) with the wall-clock fields dropped wherever they are nested."""
    if isinstance(obj, dict):
        return {k: without_timing_keys(v) for k, v in obj.items() if k not in reference.TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timing_keys(v) for v in obj]
    return obj


@pytest.mark.slow
def test_three_pretraining_and_fine_tuning_runs_give_identical_weights_and_metrics(tmp_path):
    """Pretraining (DeepSpeed, one process) and fine-tuning, three runs each: the same exported bytes."""
    from test_data import TINY, make_examples, make_vocab

    from bert.finetune import FinetuneConfig
    from bert.finetune import main as finetune
    from bert.pretrain.config import TrainConfig
    from bert.pretrain.rank import main as pretrain

    examples = make_examples(
        tmp_path / "examples", make_vocab(tmp_path / "vocab"), num_train=64, num_valid=16
    )
    rows = [f"{' '.join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6))}\t{i % 2}\n" for i in range(48)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows[:32]))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[32:]))
    runs = []
    for run in range(3):
        out = tmp_path / f"run{run}"
        pretrain(TrainConfig(examples=str(examples), out=str(out / "pretrain"), model_overrides=TINY,
                             micro_batch_size=4, gradient_accumulation_steps=2, lr=1e-2, warmup_steps=2,
                             max_steps=4, progress_bar=False, tensorboard=False))  # fmt: skip
        finetune(FinetuneConfig(task="sst2", model=out / "pretrain" / "hf", out=out / "finetune",
                                train=tmp_path / "train.tsv", eval=tmp_path / "dev.tsv", seeds=(0,), epochs=2,
                                batch_size=8, max_seq_length=32, progress=False))  # fmt: skip
        metrics = [json.loads(line) for line in (out / "pretrain/metrics.jsonl").read_text().splitlines()]
        runs.append(
            {
                "hf": stage_files(out / "pretrain/hf"),
                "pretrain metrics": without_timing_keys(metrics),
                "finetune metrics": without_timing_keys(
                    json.loads((out / "finetune/metrics.json").read_text())
                ),
                "predictions": stage_files(out / "finetune/predictions"),
            }
        )
    assert runs[0]["hf"] and runs[0]["predictions"] and len(runs[0]["pretrain metrics"]) >= 4
    for other in runs[1:]:
        for key, value in runs[0].items():
            assert other[key] == value, key
