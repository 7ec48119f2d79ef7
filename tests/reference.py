"""The straight two-rank pretraining run that the resume, resize, ZeRO and multi-node tests compare against.

One launch for the whole test session (conftest's ``reference_run``) instead of one per test: every run compared
with it uses ``reference_args`` and differs only in how it gets there (stopped and resumed, on another number of
ranks or nodes, under another ZeRO stage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BERTPIPE = Path(sys.executable).parent / "bertpipe"
REPO = Path(__file__).resolve().parents[1]
STEPS = 30
SAVED = (6, 12, 18, 24, 30)  # the checkpoints it keeps, to compare runs that stop earlier
# metrics.jsonl's wall-clock fields: they differ from run to run, everything else must not.
TIMING_KEYS = {"step_time_s", "tokens_per_s", "tokens_per_s_per_rank", "samples_per_s", "train_seconds",
               "data_wait_s", "data_wait_share"}  # fmt: skip
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # dropout is seeded per rank


def make_reference_stage(root: Path) -> tuple[Path, Path]:
    """(a finished examples stage of 256 train / 32 valid examples, a TINY model config without dropout)."""
    from test_data import make_training_stage

    from bert.model import BertConfig

    examples, model_config = make_training_stage(root, num_train=256, num_valid=32)
    BertConfig.from_json_file(model_config, **NO_DROPOUT).to_json_file(model_config)
    return examples, model_config


def reference_args(stage: tuple[Path, Path], deepspeed: str = "zero2_fp32") -> list[str]:
    """``bertpipe pretrain`` settings shared by the reference run and every run compared with it."""
    examples, model_config = stage
    return ["pretrain", "--examples", str(examples), "--model-config", str(model_config),
            "--deepspeed-config", str(REPO / "deepspeed_configs" / f"{deepspeed}.json"),
            "--global-batch-size", "16", "--micro-batch-size", "4", "--lr", "1e-2", "--warmup-steps", "3",
            "--schedule-steps", "34", "--log-example-indices", "--no-progress"]  # fmt: skip


def run_bertpipe(*args: str, timeout: int = 600) -> str:
    """``bertpipe ARGS`` with one thread per process (2 shared cores); its output (the test fails if it fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(BERTPIPE), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@dataclass
class ReferenceRun:
    out: Path
    output: str
    shm_left: set[Path]  # DeepSpeed all-reduce buffers in /dev/shm that the run left behind


def run_reference(stage: tuple[Path, Path], out: Path) -> ReferenceRun:
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    output = run_bertpipe(*reference_args(stage), "--out", str(out), "--num-gpus", "2", "--max-steps", str(STEPS),
                          "--save-every", "6", "--keep-last", "10")  # fmt: skip
    shm_left = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before
    return ReferenceRun(out, output, shm_left)


def losses(run: Path) -> dict[int, float]:
    """step → training loss, from metrics.jsonl."""
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
