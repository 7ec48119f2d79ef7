"""bert/pretrain/data.py's batch collation and its prefetching, and the training loop's input path.

The vectorised ``Collator`` must give byte-identical batches to the per-row collator it replaced (kept here,
``per_row_collate``, as the reference); the ``Prefetcher`` must give the batches of the plain stream and never
move the saved data position past what steps consumed; ``fit`` logs how long steps waited for data, reads
metrics back on logged steps only and lets the ranks agree on stopping every few steps.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from bert.pretrain.data import (
    IGNORE_INDEX,
    Collator,
    DataPosition,
    ExampleShards,
    Prefetcher,
    RankBatches,
    dynamic_mask,
)
from data_prep.schema import (
    SPECIAL_TOKENS,
    WORD_START_COLUMN,
    ExampleMetadata,
    example_schema,
    special_ids_of,
    vocab_fingerprint,
)

# 100 ids: the 5 special tokens, 60 words, 35 "##" pieces (whole-word masking over the vocabulary)
TOKENS = [*SPECIAL_TOKENS, *[f"w{i}" for i in range(60)], *[f"##p{i}" for i in range(35)]]
MODES = ["static", "dynamic", "whole-word-column", "whole-word-pieces"]


def write_shards(directory: Path, mode: str, num_examples: int = 80, seed: int = 0) -> ExampleShards:
    """Two shards of several record batches each, masked as ``mode`` says (``MODES``)."""
    masking = "static" if mode == "static" else "dynamic"
    metadata = ExampleMetadata(
        vocab_fingerprint=vocab_fingerprint(TOKENS),
        vocab_size=len(TOKENS),
        special_ids=special_ids_of(TOKENS),
        max_seq_length=40,
        masking=masking,
        masked_lm_prob=0.15,
        max_predictions_per_seq=6,
        whole_word_mask=mode.startswith("whole-word"),
        seed=seed,
    )
    schema = example_schema(metadata)
    if mode == "whole-word-pieces":  # shards from before the word_start column: "##" pieces make the words
        schema = pa.schema([f for f in schema if f.name != WORD_START_COLUMN], metadata=schema.metadata)
    rng = np.random.default_rng(seed)
    rows = {name: [] for name in schema.names}
    for _ in range(num_examples):
        len_a, len_b = int(rng.integers(1, 18)), int(rng.integers(1, 18))
        ids = [2, *rng.integers(5, 100, len_a).tolist(), 3, *rng.integers(5, 100, len_b).tolist(), 3]
        ids[int(rng.integers(1, len(ids)))] = 1  # an [UNK]: never predicted
        positions, originals = [], []
        if masking == "static":
            candidates = [i for i, t in enumerate(ids) if t >= 5]
            positions = sorted(rng.choice(candidates, size=min(6, len(candidates)), replace=False).tolist())
            originals = [ids[p] for p in positions]
            for p in positions:
                ids[p] = 4
        rows["input_ids"].append(ids)
        rows["token_type_ids"].append([0] * (len_a + 2) + [1] * (len_b + 1))
        rows["next_sentence_label"].append(int(rng.integers(0, 2)))
        rows["masked_lm_positions"].append(positions)
        rows["masked_lm_ids"].append(originals)
        rows["a_doc_id"].append(0)
        rows["b_doc_id"].append(0)
        if WORD_START_COLUMN in rows:
            rows[WORD_START_COLUMN].append((rng.random(len(ids)) < 0.6).astype(int).tolist())
    table = pa.Table.from_pydict(rows, schema=schema)
    directory.mkdir(parents=True, exist_ok=True)
    half = num_examples // 2
    paths = []
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        paths.append(directory / f"part-{i}.arrow")
        with pa.OSFile(str(paths[-1]), "wb") as sink, ipc.new_stream(sink, schema) as writer:
            for batch in part.to_batches(max_chunksize=13):  # several record batches per shard
                writer.write_batch(batch)
    return ExampleShards(paths)


def per_row_collate(c: Collator, dataset: ExampleShards, indices: np.ndarray, epoch: int) -> dict:
    """The collator as it was before it was vectorised: one example at a time (the reference)."""
    examples = [dataset[int(i)] for i in indices]
    longest = max(len(e["input_ids"]) for e in examples)
    m = c.pad_to_multiple_of
    length = (longest + m - 1) // m * m
    n = len(examples)
    input_ids = np.full((n, length), c.pad_id, dtype=np.int64)
    token_type_ids = np.zeros((n, length), dtype=np.int64)
    attention_mask = np.zeros((n, length), dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    nsp = np.zeros(n, dtype=np.int64)
    for row, (index, example) in enumerate(zip(indices, examples, strict=True)):
        ids = np.asarray(example["input_ids"], dtype=np.int64)
        if c.dynamic:
            word_start = example.get(WORD_START_COLUMN) if c.whole_word else None
            ids, positions, originals = dynamic_mask(
                ids, np.random.default_rng([c.seed, epoch, int(index)]), c.never_predicted, c.replacement_ids,
                c.mask_id, c.metadata.masked_lm_prob, c.metadata.max_predictions_per_seq, c.is_continuation,
                word_start,
            )  # fmt: skip
        else:
            positions = np.asarray(example["masked_lm_positions"], dtype=np.int64)
            originals = np.asarray(example["masked_lm_ids"], dtype=np.int64)
        k = len(ids)
        input_ids[row, :k] = ids
        token_type_ids[row, :k] = example["token_type_ids"]
        attention_mask[row, :k] = 1
        labels[row, positions] = originals
        nsp[row] = example["next_sentence_label"]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "token_type_ids": torch.from_numpy(token_type_ids),
        "labels": torch.from_numpy(labels),
        "next_sentence_label": torch.from_numpy(nsp),
    }


def assert_same_batch(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        if not torch.is_tensor(value):  # max_seqlen
            assert got[name] == value, name
            continue
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, ExampleShards]:
    root = tmp_path_factory.mktemp("collate")
    return {mode: write_shards(root / mode, mode, seed=i) for i, mode in enumerate(MODES)}


@pytest.mark.parametrize("mode", MODES)
def test_vectorised_collation_equals_the_per_row_reference_byte_for_byte(shards, mode):
    dataset = shards[mode]
    rng = np.random.default_rng(1)
    for pad in (8, 1):
        collator = Collator(dataset.metadata, seed=3, pad_to_multiple_of=pad, tokens=TOKENS)
        masked = 0
        for epoch in range(3):
            for size in (1, 5, 24):  # 24 of 80: across record batches and both shards, in random order
                indices = rng.choice(len(dataset), size=size, replace=False)
                expected = per_row_collate(collator, dataset, indices, epoch)
                assert_same_batch(collator(dataset, indices, epoch), expected)
                masked += int((expected["labels"] != IGNORE_INDEX).sum())
        assert masked > 100  # the batches did mask: 80/10/10 and whole words were compared, not only padding


def test_collation_refuses_ids_the_embedding_tables_cannot_take(shards):
    dataset = shards["dynamic"]
    small_vocab = dataclasses.replace(dataset.metadata, vocab_size=50)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=50\)"):
        Collator(small_vocab, seed=0)(dataset, np.arange(10), epoch=0)
    with pytest.raises(ValueError, match=r"type_vocab_size=1"):
        Collator(dataset.metadata, seed=0, type_vocab_size=1)(dataset, np.arange(10), epoch=0)


def stream(dataset: ExampleShards, position: DataPosition | None = None) -> RankBatches:
    # 80 examples, global batch 16 (micro 4 × accumulation 2 × 2 ranks): 5 batches per epoch
    return RankBatches(dataset, seed=5, rank=1, world_size=2, micro_batch_size=4, accumulation_steps=2,
                       position=position)  # fmt: skip


def test_prefetched_batches_and_a_resume_equal_the_plain_stream(shards):
    dataset = shards["whole-word-column"]
    collator = Collator(dataset.metadata, seed=3, tokens=TOKENS)
    plain, expected = stream(dataset), []
    for _ in range(12):  # across two epoch boundaries
        epoch, micro = plain.next()
        expected.append((epoch, micro, [collator(dataset, m, epoch) for m in micro], plain.position))

    calls, ahead = [0], threading.Event()

    def counting_collate(indices: np.ndarray, epoch: int) -> dict:
        calls[0] += 1
        if calls[0] >= 2 * (7 + 3):  # 7 batches consumed + a full queue of 3: the thread is ahead
            ahead.set()
        return collator(dataset, indices, epoch)

    first = stream(dataset)
    prefetcher = Prefetcher(first, counting_collate, depth=3)
    got = [prefetcher.next() for _ in range(7)]
    assert ahead.wait(timeout=120), "the prefetcher did not run ahead"
    assert first.position == expected[6][3] == DataPosition(epoch=1, cursor=32)  # consumed, not collated
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    assert first.position == expected[6][3]

    resumed = stream(
        dataset, position=DataPosition(**first.position.to_dict())
    )  # as a checkpoint restores it
    with Prefetcher(resumed, lambda indices, epoch: collator(dataset, indices, epoch), depth=2) as prefetcher:
        got += [prefetcher.next() for _ in range(5)]
    for batch, (epoch, micro, micro_batches, position) in zip(got, expected, strict=True):
        assert batch.epoch == epoch and batch.position == position
        assert all(np.array_equal(a, b) for a, b in zip(batch.indices, micro, strict=True))
        for a, b in zip(batch.micro_batches, micro_batches, strict=True):
            assert_same_batch(a, b)
            assert not a["input_ids"].is_pinned()  # pinned only where CUDA is


def test_a_collation_error_is_raised_in_the_training_loop(shards):
    def failing(indices: np.ndarray, epoch: int) -> dict:
        raise ValueError("token ids must be in [0, vocab_size=50)")

    prefetcher = Prefetcher(stream(shards["dynamic"]), failing, depth=2)
    with pytest.raises(ValueError, match="vocab_size=50"):
        prefetcher.next()
    assert not prefetcher._thread.is_alive()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_prefetched_batches_are_pinned_where_cuda_is(shards):
    dataset = shards["dynamic"]
    collator = Collator(dataset.metadata, seed=3)
    with Prefetcher(stream(dataset), lambda i, e: collator(dataset, i, e)) as prefetcher:
        assert all(t.is_pinned() for b in prefetcher.next().micro_batches for t in b.values())


# --- the training loop, around a stand-in engine ---------------------------------------------------------


class DeviceMetrics:
    """What an engine that leaves its metrics on the device hands back: ``request()`` starts reading them
    back, its ``result()`` waits for them (``fetch()``: both)."""

    def __init__(self, engine: FakeEngine, step: int):
        self.engine, self.step = engine, step

    def request(self) -> DeviceMetrics:
        self.engine.requested.append(self.step)
        return self

    def result(self) -> dict:
        self.engine.fetched.append((self.step, self.engine.global_step))  # (whose, read at which step)
        return {"loss": 1.0 / self.step, "tokens": 100, "samples": 8, "lr": 1e-3}

    def fetch(self) -> dict:
        return self.request().result()


class FakeEngine:
    """Counts steps and records which steps' metrics the loop read back."""

    def __init__(self):
        self.global_step, self.requested, self.fetched, self.inputs = 0, [], [], []

    def step(self, micro_batches: list[dict]) -> DeviceMetrics:
        self.inputs.append(micro_batches)
        self.global_step += 1
        return DeviceMetrics(self, self.global_step)

    def cuda_graph_warning(self) -> None:  # no compilation here: nothing to warn of
        return None


def fake_run(dataset: ExampleShards, out: Path, world_size: int, **config):
    from bert.model import BertConfig
    from bert.pretrain.config import TrainConfig
    from bert.pretrain.run import Run

    config = TrainConfig(examples=str(out), out=str(out), micro_batch_size=4, gradient_accumulation_steps=2,
                         decay="constant", progress_bar=False, tensorboard=False, **config)  # fmt: skip
    batch = config.batch_sizes(world_size)
    run = Run(config, out, 0, world_size, batch, BertConfig.preset("tiny", vocab_size=100), dataset.metadata,
              out, TOKENS, dataset, None, Collator(dataset.metadata, seed=0, tokens=TOKENS))  # fmt: skip
    run.engine = FakeEngine()
    run.batches = RankBatches(dataset, 0, 0, world_size, 4, 2)
    return run


@pytest.fixture
def saves(monkeypatch) -> list:
    """Checkpoints and exports as records: (step, data position) of each save."""
    import bert.pretrain.rank as rank

    saved = []

    def save(run):
        saved.append((run.engine.global_step, DataPosition(**run.batches.position.to_dict())))
        return run.out / f"checkpoints/step-{run.engine.global_step}"

    monkeypatch.setattr(rank, "save_checkpoint", save)
    monkeypatch.setattr(rank, "export_hf", lambda run, checkpoint: run.out / "hf")
    return saved


def test_fit_logs_data_wait_and_reads_metrics_on_logged_steps_only(shards, tmp_path: Path, saves):
    from bert.pretrain.rank import fit

    run = fake_run(shards["dynamic"], tmp_path, world_size=1, max_steps=7, log_every=3)
    result = fit(run)
    assert result.step == 7 and result.stop_reason == "max_steps"
    # each logged step's metrics are read once the next step is queued; the last step's for the result
    assert run.engine.requested == [3, 6, 7]
    assert run.engine.fetched == [(3, 4), (6, 7), (7, 7)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert 0 <= r["data_wait_s"] <= r["step_time_s"] and 0 <= r["data_wait_share"] <= 1
        assert r["tokens_per_s"] == pytest.approx(100 / r["step_time_s"])
    assert result.metrics["step"] == 7 and result.metrics["loss"] == 1 / 7
    assert saves == [(7, DataPosition(epoch=0, cursor=7 * 8))]


def test_ranks_agree_on_stopping_every_few_steps_and_save_the_consumed_position(
    shards, tmp_path: Path, saves, monkeypatch
):
    import bert.pretrain.engine as eng
    from bert.pretrain.engine import host_inputs
    from bert.pretrain.rank import STOP_CHECK_EVERY, fit

    agreed = []

    def agree_stop(code: int) -> int:  # another rank got SIGTERM after step 5
        agreed.append(run.engine.global_step)
        return 2 if run.engine.global_step >= 5 else code

    monkeypatch.setattr(eng, "agree_stop", agree_stop)
    run = fake_run(shards["dynamic"], tmp_path, world_size=2, max_steps=100)
    result = fit(run)
    stop = 2 * STOP_CHECK_EVERY  # the first agreement at or after step 5
    assert stop >= 5 and agreed == list(range(0, stop + 1, STOP_CHECK_EVERY))
    assert result.step == stop and result.stop_reason == "sigterm"
    plain = RankBatches(run.train, 0, 0, 2, 4, 2)
    assert len(run.engine.inputs) == stop
    for micro_batches in run.engine.inputs:  # the batches the steps got: the plain stream's, in order
        epoch, micro = plain.next()
        for got, indices in zip(micro_batches, micro, strict=True):
            # with the packing and MLM positions, added on the prefetch thread
            assert_same_batch(got, host_inputs(run.collator(run.train, indices, epoch)))
    assert saves == [(stop, plain.position)]  # what the steps consumed, not what was collated ahead
    assert plain.position == DataPosition(epoch=1, cursor=(stop - 5) * 16)


class MatmulEngine(FakeEngine):
    """A fake engine whose step does some arithmetic for the profiler to see."""

    device = torch.device("cpu")

    def step(self, micro_batches: list[dict]) -> DeviceMetrics:
        x = torch.randn(64, 64)
        for _ in range(20):
            x = torch.mm(x, x).tanh()
        return super().step(micro_batches)


def test_profile_steps_write_a_trace_and_a_summary_of_the_window(shards, tmp_path: Path, saves):
    from bert.pretrain.rank import fit

    run = fake_run(shards["dynamic"], tmp_path, world_size=1, max_steps=6, profile_steps="2:4")
    run.engine = MatmulEngine()
    assert fit(run).step == 6
    profile = tmp_path / "profile" / "rank0"
    summary = json.loads((profile / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["device"] == "cpu" and summary["wall_ms_per_step"] > 0
    assert summary["busy_share"] > 0 and summary["ms_per_step_by_kind"]["matmul"] > 0
    assert any(row["name"] == "aten::mm" and row["calls"] == 3 * 20 for row in summary["top"])
    assert json.loads((profile / "trace.json").read_text())["traceEvents"]
    assert "aten::mm" in (profile / "table.txt").read_text()


def test_profile_steps_are_checked_with_the_config():
    from bert.pretrain.config import TrainConfig, parse_profile_steps

    assert parse_profile_steps("20:24") == (20, 24) and parse_profile_steps(None) is None
    for bad in ("24:20", "0:3", "5", "a:b"):
        with pytest.raises(ValueError, match="profile_steps.*START:STOP"):
            TrainConfig(examples="e", out="o", max_steps=1, profile_steps=bad)


def test_a_cuda_profile_counts_each_kernel_once():
    """An operator's self device time is its kernels' time, and the kernels are rows too: only they count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bert.pretrain.profile import summarise

    def event(name, device_type, device_us, cpu_us=0.0, annotation=False):
        return SimpleNamespace(key=name, count=2, device_type=device_type, self_device_time_total=device_us,
                               self_cpu_time_total=cpu_us, is_user_annotation=annotation)  # fmt: skip

    events = [event("aten::mm", DeviceType.CPU, 6000.0, cpu_us=400.0),
              event("sm90_xmma_gemm_bf16bf16", DeviceType.CUDA, 6000.0),
              event("aten::add", DeviceType.CPU, 1000.0, cpu_us=100.0),
              event("elementwise_kernel", DeviceType.CUDA, 1000.0),
              event("ProfilerStep", DeviceType.CUDA, 9000.0, annotation=True)]  # fmt: skip
    summary = summarise(events, steps=2, wall_s=0.01, device="cuda")
    assert summary["ms_per_step_by_kind"] == {"matmul": 3.0, "other": 0.5}
    assert summary["busy_share"] == pytest.approx(3.5 / 5.0)
    assert [row["name"] for row in summary["top"]] == ["sm90_xmma_gemm_bf16bf16", "elementwise_kernel"]
    assert [(row["self_device_ms"], row["calls_per_step"]) for row in summary["top"]] == [
        (3.0, 1.0),
        (0.5, 1.0),
    ]
    cpu = summarise(events[::2], steps=2, wall_s=0.01, device="cpu")  # on the CPU: the operators
    assert cpu["ms_per_step_by_kind"] == {"matmul": 0.2, "other": 0.05}
