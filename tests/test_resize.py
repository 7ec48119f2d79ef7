"""Resuming on another number of ranks: the same global batches, the same numbers as a run never resized.

A global batch is cut into the same micro batches on any world size (``rank_micro_batches``), so with
dropout off a run continued on 1 rank (accumulation 4) or on 2 ranks (accumulation 2) averages the same
per-micro-batch gradients as a straight run: equal up to float32 sums taken in another order, hence the
tolerances (relative 1e-4 on losses, 1e-5 absolute on weights). ZeRO checkpoints cross world sizes through
DeepSpeed's universal checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from test_data import TINY, make_examples, make_vocab

from bert.model import BertForPreTraining
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


def pretrain(out: Path, stage: tuple[Path, Path], deepspeed: str, num_gpus: int, *args: str) -> str:
    """``bertpipe pretrain`` with the reference run's settings on ``num_gpus`` ranks; its output."""
    return reference.run_bertpipe(*reference.reference_args(stage, deepspeed), "--out", str(out), "--num-gpus",
                                  str(num_gpus), *args)  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_continue_on_one_and_one_on_two_like_a_straight_run(
    training_stage, reference_run, tmp_path
):
    straight = reference_run.out
    reference_losses, reference_batches = reference.losses(straight), reference.global_batches(straight)
    reference_weights = checkpoint_state_dict(straight / "checkpoints", "step-6")

    # ZeRO-3 from 2 ranks to 1, ZeRO-1 from 1 rank to 2: both partitioned, both through the universal format.
    for deepspeed, before, after in (("zero3_fp32", 2, 1), ("zero1_fp32", 1, 2)):
        run = tmp_path / f"{deepspeed}-{before}to{after}"
        pretrain(run, training_stage, deepspeed, before, "--max-steps", "3")
        output = pretrain(run, training_stage, deepspeed, after, "--max-steps", "6", "--resume")
        assert (
            f"resumed from step-3 at step 3 (epoch 0, sample 48) on {after} ranks, written by {before}"
            in output
        )
        assert f"micro 4 × accumulation {4 // after} × {after} ranks" in output
        batches = reference.global_batches(run)
        assert batches == {s: reference_batches[s] for s in range(1, 7)}, (
            deepspeed
        )  # step s: the same 16 examples
        got = reference.losses(run)
        assert sorted(got) == list(range(1, 7))
        assert [got[s] for s in range(1, 7)] == pytest.approx(
            [reference_losses[s] for s in range(1, 7)], rel=1e-4
        ), deepspeed
        weights = checkpoint_state_dict(run / "checkpoints")
        for name, value in reference_weights.items():
            assert torch.allclose(weights[name], value, atol=1e-5), (deepspeed, name)
        if deepspeed == "zero1_fp32":  # its Hugging Face export holds exactly the fp32 master weights
            exported = BertForPreTraining.from_pretrained(run / "hf").state_dict()
            for name, value in weights.items():
                assert torch.equal(exported[name], value), name


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


@pytest.mark.slow
@pytest.mark.distributed
def test_lamb_under_zero1_on_two_ranks_is_the_layer_wise_lamb_of_zero0(training_stage, tmp_path):
    """ZeRO-1 steps flat partitions that cut layers between ranks; LAMB's trust ratio stays per layer (its
    norms summed over the ranks), so two ranks of ZeRO-1 train as one rank of ZeRO-0, where LAMB sees every
    tensor whole. A trust ratio per partition (LAMB before the partition layouts) differs from step 2."""
    runs = {}
    for deepspeed, ranks in (("zero1_fp32", 2), ("zero0_fp32", 1)):
        runs[deepspeed] = tmp_path / deepspeed
        pretrain(runs[deepspeed], training_stage, deepspeed, ranks, "--optimizer", "lamb", "--max-steps", "4")
    zero1, zero0 = (reference.losses(runs[name]) for name in ("zero1_fp32", "zero0_fp32"))
    assert sorted(zero1) == sorted(zero0) == [1, 2, 3, 4]
    assert [zero1[s] for s in range(1, 5)] == pytest.approx([zero0[s] for s in range(1, 5)], rel=1e-5)
    weights = checkpoint_state_dict(runs["zero1_fp32"] / "checkpoints")
    for name, value in checkpoint_state_dict(runs["zero0_fp32"] / "checkpoints").items():
        assert torch.allclose(weights[name], value, atol=1e-5), name
