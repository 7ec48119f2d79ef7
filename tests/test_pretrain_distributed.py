"""Pretraining through real processes: two ranks via the `deepspeed` launcher (gloo, ZeRO-2), SIGTERM, rank errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import reference
from test_data import make_vocab

from bert.pretrain.engine import checkpoint_state_dict

REPO = Path(__file__).resolve().parents[1]
BERTPIPE = Path(sys.executable).parent / "bertpipe"


@pytest.fixture(scope="module")
def stage(training_stage) -> tuple[Path, Path]:
    return training_stage


def bertpipe(*args: str, timeout: int = 500) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BERTPIPE), *args], capture_output=True, text=True, timeout=timeout, env=env)


def sigterm_after_three_steps(command: list[str], metrics: Path) -> tuple[str, int]:
    """Start a training command, SIGTERM it once metrics.jsonl holds 3 steps; its output and exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert process.poll() is None, process.communicate()[0][-3000:]  # died before training
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=200)
    return output, process.returncode


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_zero2_learn_from_different_data_and_export(reference_run):
    out = reference_run.out
    assert f"stopped at step {reference.STEPS} (max_steps)" in reference_run.output
    # DeepSpeed's CPU all-reduce leaves a 66 MB buffer per rank in /dev/shm; the ranks and launcher remove theirs
    assert not reference_run.shm_left
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, reference.STEPS + 1))
    assert all(r["samples"] == 16 for r in train)  # 4 × 2 × 2 ranks
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) - 0.5

    logs = [
        [json.loads(line) for line in (out / f"data_log/rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(logs[0]) == len(logs[1]) == reference.STEPS
    for a, b in zip(*logs, strict=True):
        assert a["step"] == b["step"] and len(a["indices"]) == len(b["indices"]) == 8
        assert not set(a["indices"]) & set(b["indices"])  # the ranks saw different examples
    epoch0 = [i for log in logs for entry in log if entry["epoch"] == 0 for i in entry["indices"]]
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 256  # an epoch covers every example once

    checkpoint = out / f"checkpoints/step-{reference.STEPS}"
    assert {p.name for p in checkpoint.glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    transformers = pytest.importorskip("transformers")
    model, info = transformers.BertForPreTraining.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = checkpoint_state_dict(out / "checkpoints")
    assert np.allclose(model.state_dict()["bert.encoder.layer.1.output.dense.weight"].numpy(),
                       merged["bert.encoder.layer.1.output.dense.weight"].numpy())  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failing_rank_is_reported_in_one_clear_message(stage, tmp_path: Path):
    examples, model_config = stage
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 7}}))
    done = bertpipe("pretrain", "--examples", str(examples), "--out", str(tmp_path / "run"), "--model-config",
                    str(model_config), "--deepspeed-config", str(bad), "--num-gpus", "1", "--max-steps", "2")  # fmt: skip
    assert done.returncode != 0
    message = done.stderr[
        done.stderr.index("error: rank 0 failed:") :
    ]  # the CLI's message, after the rank logs
    assert "stage" in message and "Input should be 0, 1, 2, 3" in message
    assert message.strip().splitlines()[-1].startswith("(full traceback:")
    assert "Traceback" not in message


def test_mismatched_examples_fail_before_the_launch(stage, tmp_path: Path):
    examples, _ = stage
    other = make_vocab(tmp_path / "other", prefix="x")
    done = bertpipe("pretrain", "--examples", str(examples), "--out", str(tmp_path / "run"), "--vocab", str(other),
                    "--max-steps", "2", "--num-gpus", "2")  # fmt: skip
    assert done.returncode == 2
    assert "error: the examples" in done.stderr and "fingerprint" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run/checkpoints").exists()


@pytest.mark.slow
def test_sigterm_writes_a_loadable_checkpoint_and_exits_cleanly(stage, tmp_path: Path):
    examples, model_config = stage
    out = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"examples": str(examples), "out": str(out), "model_config": str(model_config),
                                  "max_steps": 100000, "decay": "constant", "micro_batch_size": 4,
                                  "progress_bar": False, "tensorboard": False}))  # fmt: skip
    output, returncode = sigterm_after_three_steps(
        [sys.executable, "-m", "bert.pretrain", "--config", str(config)], out / "metrics.jsonl"
    )
    assert returncode == 0, output[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["stop_reason"] == "sigterm" and result["step"] >= 3
    tag = (out / "checkpoints/latest").read_text().strip()
    assert tag == f"step-{result['step']}"
    assert checkpoint_state_dict(out / "checkpoints")  # loadable
    state = json.loads((out / "checkpoints" / tag / "bertpipe_state.json").read_text())
    assert state["data"]["cursor"] == (result["step"] * 4) % 256 or state["data"]["epoch"] > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_through_the_launcher_then_resume_matches_a_straight_run(
    training_stage, reference_run, tmp_path
):
    """SIGTERM to `bertpipe pretrain --num-gpus 2`: both ranks stop at the same step, checkpoint, exit 0;
    --resume then continues exactly where the run that was never stopped is (losses, data order, weights)."""
    common = [*reference.reference_args(training_stage), "--num-gpus", "2"]
    stopped = tmp_path / "stopped"
    output, returncode = sigterm_after_three_steps(
        [str(BERTPIPE), *common, "--out", str(stopped), "--max-steps", "400"], stopped / "metrics.jsonl"
    )
    assert returncode == 0, output[-3000:]
    assert "(sigterm)" in output and "--resume" in output and "Traceback" not in output
    result = json.loads((stopped / "result.json").read_text())
    k = result["step"]
    assert result["stop_reason"] == "sigterm" and 3 <= k < reference.SAVED[-1]
    assert (stopped / "checkpoints/latest").read_text().strip() == f"step-{k}"
    logs = [(stopped / f"data_log/rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == k  # both ranks stopped after the same step

    end = min(s for s in reference.SAVED if s > k)  # the next step the straight run kept a checkpoint of
    reference.run_bertpipe(*common, "--out", str(stopped), "--max-steps", str(end), "--resume")
    straight = reference_run.out
    a, b = reference.losses(stopped), reference.losses(straight)
    assert sorted(a) == list(range(1, end + 1))
    assert [a[s] for s in range(1, end + 1)] == pytest.approx(
        [b[s] for s in range(1, end + 1)], rel=1e-5, abs=1e-6
    )
    for r in (0, 1):  # the same examples on the same rank at every step
        logged = (stopped / f"data_log/rank{r}.jsonl").read_text().splitlines()
        assert logged == (straight / f"data_log/rank{r}.jsonl").read_text().splitlines()[:end]
    weights = [
        checkpoint_state_dict(stopped / "checkpoints"),
        checkpoint_state_dict(straight / "checkpoints", f"step-{end}"),
    ]
    for name, value in weights[1].items():
        assert np.allclose(weights[0][name].numpy(), value.numpy(), atol=1e-6), name
