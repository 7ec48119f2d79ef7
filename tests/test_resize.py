"""Resuming on another number of ranks: the same global batches, the same numbers as a run never resized.

A global batch is cut into the same micro batches on any world size (``rank_micro_batches``), so with
dropout off a run continued on 1 rank (accumulation 4) or on 2 ranks (accumulation 2) averages the same
per-micro-batch gradients as a straight run: equal up to float32 sums taken in another order, hence the
tolerances (relative 1e-4 on losses, 1e-5 absolute on weights). ZeRO checkpoints cross world sizes through
DeepSpeed's universal checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import TINY, make_examples, make_training_stage, make_vocab

from bert.pretrain.config import TrainConfig
from bert.pretrain.data import rank_micro_batches
from bert.pretrain.engine import checkpoint_state_dict
from bert.pretrain.rank import main

REPO = Path(__file__).resolve().parents[1]
BERTPIPE = Path(sys.executable).parent / "bertpipe"
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # dropout is seeded per rank


def test_micro_batches_are_the_same_on_any_number_of_ranks():
    global_batch = np.random.default_rng(0).permutation(1000)[:32]
    by_world = {}
    for world_size in (1, 2, 4):
        accumulation = 32 // (4 * world_size)
        shares = [rank_micro_batches(global_batch, r, world_size, 4, accumulation) for r in range(world_size)]
        by_world[world_size] = sorted(tuple(m.tolist()) for share in shares for m in share)
        assert all(len(share) == accumulation for share in shares)
    assert by_world[1] == by_world[2] == by_world[4]
    assert sorted(i for m in by_world[1] for i in m) == sorted(global_batch.tolist())


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[Path, Path]:
    return make_training_stage(tmp_path_factory.mktemp("resize"), num_train=128, num_valid=16)


def pretrain(out: Path, stage: tuple[Path, Path], deepspeed: str, num_gpus: int, *args: str) -> str:
    """``bertpipe pretrain`` (global batch 16 of micro batches of 4, dropout off); its output."""
    examples, model_config = stage
    config = out.parent / f"{out.name}-config.json"
    config.write_text(json.dumps({"model_overrides": NO_DROPOUT, "tensorboard": False}))
    command = [str(BERTPIPE), "pretrain", "--config", str(config), "--examples", str(examples),
               "--model-config", str(model_config), "--out", str(out), "--num-gpus", str(num_gpus),
               "--deepspeed-config", str(REPO / "deepspeed_configs" / f"{deepspeed}.json"),
               "--global-batch-size", "16", "--micro-batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2",
               "--schedule-steps", "12", "--log-example-indices", "--no-progress", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def global_batches(run: Path) -> dict[int, list[int]]:
    """The examples of each step over all ranks (whatever the number of ranks that trained it)."""
    steps: dict[int, list[int]] = {}
    for log in (run / "data_log").glob("rank*.jsonl"):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["indices"])
    return {step: sorted(indices) for step, indices in steps.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_continue_on_one_and_one_on_two_like_a_straight_run(stage, tmp_path: Path):
    straight = tmp_path / "straight"
    pretrain(straight, stage, "zero1_fp32", 2, "--max-steps", "6")
    reference_losses, reference_batches = losses(straight), global_batches(straight)
    reference_weights = checkpoint_state_dict(straight / "checkpoints")
    assert sorted(reference_batches) == list(range(1, 7))

    # ZeRO-3 from 2 ranks to 1, ZeRO-1 from 1 rank to 2: both partitioned, both through the universal format.
    for deepspeed, before, after in (("zero3_fp32", 2, 1), ("zero1_fp32", 1, 2)):
        run = tmp_path / f"{deepspeed}-{before}to{after}"
        pretrain(run, stage, deepspeed, before, "--max-steps", "3")
        output = pretrain(run, stage, deepspeed, after, "--max-steps", "6", "--resume")
        assert (
            f"resumed from step-3 at step 3 (epoch 0, sample 48) on {after} ranks, written by {before}"
            in output
        )
        assert f"micro 4 × accumulation {4 // after} × {after} ranks" in output
        assert global_batches(run) == reference_batches, deepspeed  # step s saw the same 16 examples
        got = losses(run)
        assert sorted(got) == list(range(1, 7))
        assert [got[s] for s in range(1, 7)] == pytest.approx(
            [reference_losses[s] for s in range(1, 7)], rel=1e-4
        ), deepspeed
        weights = checkpoint_state_dict(run / "checkpoints")
        for name, value in reference_weights.items():
            assert torch.allclose(weights[name], value, atol=1e-5), (deepspeed, name)


def test_a_changed_global_batch_is_refused_in_one_line(tmp_path: Path):
    examples = make_examples(tmp_path / "examples", make_vocab(tmp_path / "vocab"), num_train=64, num_valid=8)
    common = dict(examples=str(examples), out=str(tmp_path / "run"), model_overrides=TINY, micro_batch_size=4,
                  decay="constant", progress_bar=False, tensorboard=False)  # fmt: skip
    main(TrainConfig(**common, global_batch_size=8, max_steps=2))
    with pytest.raises(ValueError) as refused:
        main(TrainConfig(**common, global_batch_size=16, max_steps=4, resume=True))
    message = str(refused.value)
    assert "\n" not in message
    assert "global batch of 8" in message and "--global-batch-size 8" in message
