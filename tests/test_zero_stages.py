"""Every ZeRO stage trains, resumes exactly and exports the fp32 master weights (two ranks, gloo, launcher).

ZeRO-3 bf16 and ZeRO-1 bf16 with LAMB (DeepSpeed's BF16_Optimizer: the shipped config accumulates gradients
in fp32): a straight run, the same run resumed from its step-3 checkpoint (same losses, same weights), an HF export
that transformers loads with no missing or unexpected key and that equals the checkpoint's fp32 master
weights, and a phase 2 (``--init-from``) that starts from that export. ZeRO-1 and ZeRO-3 fp32 resume (on another
number of ranks) and ZeRO-1 fp32's export are in test_resize.py, ZeRO-2's in test_pretrain_distributed.py. ZeRO-0 bf16
(one process) exports the optimizer's fp32 master copies, not their bf16 rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import TINY, make_training_stage

from bert.pretrain.config import TrainConfig
from bert.pretrain.engine import MASTER_NAMES, checkpoint_state_dict, slow_optimizer_warning
from bert.pretrain.rank import main

REPO = Path(__file__).resolve().parents[1]
BERTPIPE = Path(sys.executable).parent / "bertpipe"


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[Path, Path]:
    return make_training_stage(tmp_path_factory.mktemp("zero"), num_train=128, num_valid=16)


def pretrain(out: Path, stage: tuple[Path, Path], deepspeed: str, *args: str) -> str:
    """``bertpipe pretrain`` on the tiny stage, global batch 16 of micro batches of 4; its output."""
    examples, model_config = stage
    command = [str(BERTPIPE), "pretrain", "--examples", str(examples), "--model-config", str(model_config),
               "--out", str(out), "--deepspeed-config", str(REPO / "deepspeed_configs" / f"{deepspeed}.json"),
               "--global-batch-size", "16", "--micro-batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2",
               "--schedule-steps", "12", "--no-progress", *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("deepspeed", ["zero3_bf16", "zero1_bf16"])
def test_zero_stage_resumes_exactly_exports_master_weights_and_starts_phase_two(
    stage, tmp_path: Path, deepspeed: str
):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # ZeRO-1 bf16 with LAMB (the base-phase1/2 recipe): its trust ratios over partitions spread on 2 ranks
    optimizer = ["--optimizer", "lamb"] if deepspeed == "zero1_bf16" else []
    pretrain(
        straight, stage, deepspeed, "--num-gpus", "2", "--max-steps", "5", "--save-every", "3", *optimizer
    )
    # The run as if it had stopped after its step-3 checkpoint (one launch fewer than stopping one at step 3):
    # what came after is gone, `latest` names step 3; --resume continues from there on two new ranks.
    shutil.copytree(straight, split, ignore=shutil.ignore_patterns("step-5", "hf", "result.json"))
    assert sorted(p.name for p in (split / "checkpoints").glob("step-*")) == ["step-3"]
    (split / "checkpoints" / "latest").write_text("step-3")
    output = pretrain(split, stage, deepspeed, "--num-gpus", "2", "--max-steps", "5", "--resume", *optimizer)
    assert "resumed from step-3 " in output  # not a second straight run

    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert [b[s] for s in range(1, 6)] == pytest.approx([a[s] for s in range(1, 6)], rel=1e-6)
    weights = checkpoint_state_dict(straight / "checkpoints")  # the fp32 master weights at step 5
    resumed = checkpoint_state_dict(split / "checkpoints")
    for name, value in weights.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name

    transformers = pytest.importorskip("transformers")
    model, info = transformers.BertForPreTraining.from_pretrained(straight / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    exported = model.state_dict()
    for name, value in weights.items():
        assert torch.equal(exported[name], value), name
    if "bf16" in deepspeed:  # the masters, not the bf16 working copy the ranks computed with
        dense = exported["bert.encoder.layer.1.output.dense.weight"]
        assert not torch.equal(dense, dense.bfloat16().float())

    examples, _ = stage
    phase2 = main(TrainConfig(examples=str(examples), out=str(tmp_path / "phase2"), init_from=str(straight),
                              model_overrides=TINY, micro_batch_size=4, max_steps=2, progress_bar=False,
                              tensorboard=False), do_train=False)  # fmt: skip
    assert phase2.engine.global_step == 0
    start = phase2.engine.module.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight"):
        assert torch.equal(start[name], weights[name]), name


@pytest.mark.slow
def test_zero0_bf16_exports_the_fp32_master_weights_not_their_bf16_rounding(stage, tmp_path: Path):
    examples, _ = stage
    out = tmp_path / "run"
    main(TrainConfig(examples=str(examples), out=str(out), model_overrides=TINY, micro_batch_size=4,
                     deepspeed_config=str(REPO / "deepspeed_configs/zero0_bf16.json"), lr=1e-2, max_steps=3,
                     progress_bar=False, tensorboard=False))  # fmt: skip
    saved = torch.load(out / "checkpoints/step-3/mp_rank_00_model_states.pt", weights_only=False)
    masters = {
        name: tensor
        for names, group in zip(saved[MASTER_NAMES], saved["optimizer"]["fp32_groups"], strict=True)
        for name, tensor in zip(names, group, strict=True)
    }
    working = saved["module"]  # the bf16 weights the rank computed with
    assert working["bert.pooler.dense.weight"].dtype == torch.bfloat16

    transformers = pytest.importorskip("transformers")
    model, info = transformers.BertForPreTraining.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    exported = model.state_dict()
    assert set(masters) <= set(exported)
    for name, master in masters.items():
        assert master.dtype == torch.float32
        assert torch.equal(master.bfloat16(), working[name]), name  # the right master for each name
        assert torch.equal(exported[name], master), name
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())  # not a bf16 rounding
    tied = exported["cls.predictions.decoder.weight"]  # saved under both names: the master under both
    assert torch.equal(tied, masters["bert.embeddings.word_embeddings.weight"])


def against_a_plain_loop(deepspeed: str, steps: int, micro: int, clip: float, optimizer: str = "adamw",
                         **engine_settings) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:  # fmt: skip
    """(each step's loss and gradient norm before clipping: an Engine under ``deepspeed_configs/DEEPSPEED.json``,
    the same for a plain PyTorch loop: the same optimizer and parameter groups, ``clip_grad_norm_``, the same
    learning rates, fp32 on the CPU), ``steps`` of ``micro`` micro batches. Checks that DeepSpeed's backward
    prologue ran once for each micro batch (``backward_prologue_hook``). ``engine_settings``: ``compile``,
    ``compile_options``, ``pack_multiple_of``, ``model_overrides``."""
    from test_sync_free import MODEL, make_batch, make_engine

    from bert import BertConfig, BertForPreTraining
    from bert.optim import build_optimizer, lr_multiplier
    from bert.pretrain import engine as eng

    eng.init_distributed()
    batches = [[make_batch(10 * step + i + 1, 0) for i in range(micro)] for step in range(steps)]

    def lr_at(step: int) -> float:
        return 1e-2 * lr_multiplier(step, 1, 4, "linear")

    torch.manual_seed(0)
    plain = BertForPreTraining(BertConfig(**MODEL)).train()
    plain_optimizer = build_optimizer(plain, optimizer, 1e-2, (0.9, 0.999), 1e-6, 0.01, fused=True)
    expected = []
    for step in range(steps):
        for group in plain_optimizer.param_groups:
            group["lr"] = lr_at(step)
        plain_optimizer.zero_grad(set_to_none=True)
        losses = [plain(**b).loss for b in batches[step]]
        for loss in losses:
            (loss / micro).backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
        plain_optimizer.step()
        expected.append((sum(loss.item() for loss in losses) / micro, norm.item()))

    engine = make_engine(1, clip, None, optimizer, accumulation=micro, deepspeed=deepspeed, lr_at=lr_at,
                         **engine_settings)  # fmt: skip
    prologue, prologues = engine.engine._backward_prologue, []
    engine.engine._backward_prologue = lambda: (prologues.append(1), prologue())
    got = []
    for step in range(steps):
        metrics = engine.step(batches[step]).fetch()
        got.append((metrics["loss"], metrics["grad_norm"]))
    assert len(prologues) == steps * micro  # DeepSpeed's backward prologue ran once for each micro batch
    return got, expected


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # DeepSpeed's torch calls
@pytest.mark.parametrize("deepspeed", sorted(p.stem for p in (REPO / "deepspeed_configs").glob("*.json")))
def test_accumulated_micro_batches_give_the_plain_loops_gradient(deepspeed: str):
    """One step over 3 micro batches: the gradient DeepSpeed steps with (its norm, before clipping) is the plain
    loop's mean of the 3 micro batches' gradients, under every shipped JSON. (BF16_Optimizer, zero1_bf16's,
    counted the first micro batch 3 times and the second twice while DeepSpeed's backward prologue, which clears
    them, did not run: ``backward_prologue_hook``; tests/test_gpu.py runs zero1_bf16 compiled, with varlen
    attention, on a GPU.)"""
    if "fp16" in deepspeed and not torch.cuda.is_available():
        pytest.skip("DeepSpeed's fp16 needs a GPU")
    got, expected = against_a_plain_loop(deepspeed, steps=1, micro=3, clip=1e9)
    # fp32 to float rounding; bf16/fp16 to their rounding of weights and activations (3 micro batches double
    # counted were 2.2 times the norm)
    assert got[0][1] == pytest.approx(expected[0][1], rel=1e-5 if "fp32" in deepspeed else 2e-2)


STEP_CASES = [
    (c, "adamw")
    for c in sorted(p.stem for p in (REPO / "deepspeed_configs").glob("*.json"))
    if "fp16" not in c
]
STEP_CASES += [("zero1_fp32", "lamb"), ("zero2_fp32", "lamb"), ("zero1_bf16", "lamb")]  # LAMB over partitions


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # DeepSpeed's torch calls
@pytest.mark.parametrize(("deepspeed", "optimizer"), STEP_CASES)
def test_three_steps_train_as_a_plain_loop(deepspeed: str, optimizer: str):
    """Three steps of 2 micro batches, clipped at 1.0, warmup then decay: each step's loss and gradient norm are
    a plain PyTorch loop's (the same optimizer and parameter groups, ``clip_grad_norm_``, the same learning
    rates), under every shipped JSON: what DeepSpeed adds (accumulation, clipping, partitions) changes nothing.
    fp32 to float rounding, bf16 to its rounding."""
    got, expected = against_a_plain_loop(deepspeed, steps=3, micro=2, clip=1.0, optimizer=optimizer)
    tolerance = 1e-5 if "fp32" in deepspeed else 2e-2
    assert [g for pair in got for g in pair] == pytest.approx(
        [e for pair in expected for e in pair], rel=tolerance
    )


def test_shipped_zero1_bf16_runs_bf16_optimizer_with_half_the_host_work():
    """deepspeed_configs/zero1_bf16.json accumulates gradients in fp32: DeepSpeed's BF16_Optimizer, which
    launches far less per step than its bf16-accumulating ZeRO optimizer (an overflow test per gradient
    tensor, a bucket copy per parameter) and reads the device fewer times (benchmarks/step_overhead.py)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_overhead

    configs = step_overhead.deepspeed_configs()
    shipped = step_overhead.run_deepspeed(configs["zero1_bf16"], "cpu", steps=1, warmup=1)
    default = step_overhead.run_deepspeed(configs["zero1_bf16_bf16_accumulation"], "cpu", steps=1, warmup=1)
    assert (shipped["optimizer"], default["optimizer"]) == ("BF16_Optimizer", "DeepSpeedZeroOptimizer")
    assert set(shipped["phases"]) == {"forward", "backward", "step"}
    assert shipped["phases"]["forward"]["launches"] == default["phases"]["forward"]["launches"] > 0
    assert shipped["launches_per_step"] < 0.6 * default["launches_per_step"]
    assert shipped["syncs_per_step"] < default["syncs_per_step"]
    # ZeRO-0 bf16: an overflow test read back per parameter tensor; bertpipe warns about it on a GPU
    zero0 = step_overhead.run_deepspeed(configs["zero0_bf16"], "cpu", steps=1, warmup=1)
    assert zero0["optimizer"] == "FP16_UnfusedOptimizer"
    # 206 overflow tests (one per BERT-base parameter tensor) + 206 reads of the CPU AdamW's step counts
    assert zero0["phases"]["step"]["syncs"] >= 2 * 206
    assert slow_optimizer_warning(zero0["optimizer"], "cuda:0") and not slow_optimizer_warning(
        zero0["optimizer"], "cpu"
    )
    assert not slow_optimizer_warning(shipped["optimizer"], "cuda:0")
