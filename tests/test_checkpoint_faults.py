"""Checkpoint faults on a rank: a save cut short (a torn checkpoint) and a full disk.

A kill inside a save leaves a checkpoint directory without its bertpipe_state.json, or a ``latest`` that is
empty or names such a directory. ``--resume`` must continue from the newest complete checkpoint, say which and
why, and end with exactly the weights of a run that was never interrupted. A full disk must be one line that
says so and where, exit code 2, even when the rank cannot write its error file.

In one process (DeepSpeed, a world of one over gloo), as tests/test_pretrain.py; ``cli`` runs in a process of
its own, since it destroys the process group this process trains in.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import TINY, make_examples, make_vocab

from bert.pretrain.config import TrainConfig
from bert.pretrain.engine import checkpoint_state_dict
from bert.pretrain.rank import main
from bert.pretrain.run import STATE_FILE, checkpoint_tags

pytestmark = pytest.mark.slow  # DeepSpeed runs (a world of one) and a rank in a process of its own

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 8  # the straight run's length; the interrupted runs stop at 4 with checkpoints at 2 and 4


def tiny_config(examples: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(examples=str(examples), out=str(out), model_overrides=TINY, micro_batch_size=4,
                  gradient_accumulation_steps=2, lr=1e-2, warmup_steps=2, max_steps=NUM_STEPS,
                  schedule_steps=NUM_STEPS, save_every=2, eval_every=0, progress_bar=False,
                  tensorboard=False)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(examples, root): root/straight trained to NUM_STEPS, root/stopped to step 4 (checkpoints 2 and 4)."""
    root = tmp_path_factory.mktemp("faults")
    vocab = make_vocab(root / "vocab")
    examples = make_examples(root / "examples", vocab, num_train=64, num_valid=16)
    assert main(tiny_config(examples, root / "straight")).step == NUM_STEPS
    assert main(tiny_config(examples, root / "stopped", max_steps=4)).step == 4
    assert checkpoint_tags(root / "stopped/checkpoints") == ["step-2", "step-4"]
    return examples, root


def empty_latest(checkpoints: Path) -> None:
    (checkpoints / "latest").write_text("")  # DeepSpeed truncated it, then the process died


def latest_names_a_step_without_state(checkpoints: Path) -> None:
    (checkpoints / "step-4" / STATE_FILE).unlink()  # killed after `latest`, before the state file
    for optimizer_file in (checkpoints / "step-4").glob("*optim_states.pt"):
        optimizer_file.unlink()  # and DeepSpeed's files only partly written


def latest_names_a_newer_torn_step(checkpoints: Path) -> None:
    shutil.copytree(checkpoints / "step-4", checkpoints / "step-6", ignore=shutil.ignore_patterns(STATE_FILE))
    (checkpoints / "latest").write_text("step-6")


@pytest.mark.parametrize(
    ("tear", "resumed_from", "why"),
    [
        (empty_latest, "step-4", "empty"),
        (latest_names_a_step_without_state, "step-2", "step-4"),
        (latest_names_a_newer_torn_step, "step-4", "step-6"),
    ],
)
def test_resume_after_a_torn_checkpoint_continues_from_the_newest_complete_one_exactly(
    runs, tmp_path: Path, caplog, tear, resumed_from: str, why: str
):
    examples, root = runs
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    tear(out / "checkpoints")
    with caplog.at_level(logging.INFO, logger="bert.pretrain"):
        result = main(tiny_config(examples, out, resume=True))
    assert result.step == NUM_STEPS and result.stop_reason == "max_steps"
    fallback = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "resum" in r.getMessage()
    ]
    assert len(fallback) == 1 and resumed_from in fallback[0] and why in fallback[0], fallback
    assert "\n" not in fallback[0]
    assert any(r.getMessage().startswith(f"resumed from {resumed_from} ") for r in caplog.records)

    straight, resumed = (
        checkpoint_state_dict(root / "straight/checkpoints"),
        checkpoint_state_dict(out / "checkpoints"),
    )
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    exported, expected = (
        load_file(out / "hf/model.safetensors"),
        load_file(root / "straight/hf/model.safetensors"),
    )
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)

    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{NUM_STEPS}"
    assert checkpoint_tags(checkpoints) == ["step-6", "step-8"]  # keep_last 2
    assert all((d / STATE_FILE).exists() for d in checkpoints.glob("step-*")), "a torn checkpoint was left"


def test_a_deepspeed_written_latest_of_an_older_run_still_resumes(runs, tmp_path: Path):
    examples, root = runs
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    with open(out / "checkpoints/latest", "w") as fd:  # as DeepSpeed's save_checkpoint wrote it
        fd.write("step-4")
    result = main(tiny_config(examples, out, resume=True, max_steps=6))
    assert result.step == 6
    assert checkpoint_tags(out / "checkpoints") == ["step-4", "step-6"]


def test_a_fresh_start_is_refused_where_complete_checkpoints_lie_without_latest(runs, tmp_path: Path):
    examples, root = runs
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    (out / "checkpoints/latest").unlink()  # killed after the first state file, before the pointer
    with pytest.raises(ValueError, match="already holds checkpoints"):
        main(tiny_config(examples, out))


def test_a_run_with_no_complete_checkpoint_resumes_from_step_zero(runs, tmp_path: Path):
    examples, root = runs
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    checkpoints = out / "checkpoints"
    for step in ("step-2", "step-4"):
        (checkpoints / step / STATE_FILE).unlink()
    (checkpoints / "latest").unlink()
    result = main(tiny_config(examples, out, resume=True, max_steps=4))
    assert result.step == 4
    assert checkpoint_tags(checkpoints) == ["step-2", "step-4"]
    weights = checkpoint_state_dict(checkpoints)
    reference = checkpoint_state_dict(root / "stopped/checkpoints", "step-4")
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


# --- a full disk ---------------------------------------------------------------------------------------

FULL_DISK_SCRIPT = """
import errno, sys
import data_prep.manifest as manifest
from bert.pretrain.rank import cli

write_json_atomic = manifest.write_json_atomic

def full_disk(path, obj):  # the disk fills up while the checkpoint at step 4 is saved
    if path.name == "bertpipe_state.json" and path.parent.name == "step-4":
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return write_json_atomic(path, obj)

manifest.write_json_atomic = full_disk
print("RESULT", cli(["--config", sys.argv[1]]))
"""


def test_a_full_disk_is_one_line_with_exit_code_2_and_the_run_resumes(runs, tmp_path: Path):
    examples, root = runs
    full, unwritable = tmp_path / "full", tmp_path / "unwritable"
    configs = []
    for out in (full, unwritable):
        configs.append(tmp_path / f"{out.name}.json")
        configs[-1].write_text(json.dumps(tiny_config(examples, out, max_steps=4).to_dict()))
    unwritable.mkdir()
    (unwritable / "logs").write_text("")  # the error file cannot be written either
    # One process each: after a failed run DeepSpeed cannot train again in the same process.
    runs_ = [subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(config)], capture_output=True,
                            text=True, cwd=REPO, timeout=600) for config in configs]  # fmt: skip
    for done in runs_:
        assert "RESULT 2" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    done = runs_[1]

    message = (full / "logs/error-rank0.txt").read_text().split("\n\n")[0]
    assert "\n" not in message and "disk is full" in message, message
    assert str(full / "checkpoints/step-4") in message and "free" in message, message
    stderr_lines = [line for line in done.stderr.splitlines() if "disk is full" in line]
    assert any(str(unwritable / "checkpoints/step-4") in line for line in stderr_lines), done.stderr[-3000:]
    assert any("error file" in line and "could not be written" in line for line in stderr_lines)
    assert not list((full / "logs").glob(".*.tmp"))  # the atomic write's temporary file is gone

    # The save that failed is not taken as complete: the run resumes from step 2 and finishes.
    assert (full / "checkpoints/latest").read_text().strip() == "step-2"
    result = main(tiny_config(examples, full, max_steps=4, resume=True))
    assert result.step == 4 and checkpoint_tags(full / "checkpoints") == ["step-2", "step-4"]
    reference = checkpoint_state_dict(root / "stopped/checkpoints", "step-4")
    weights = checkpoint_state_dict(full / "checkpoints")
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_disk_full_message_names_the_path_and_the_free_space(tmp_path: Path, monkeypatch):
    import errno

    from bert.pretrain.rank import disk_full_message

    target = tmp_path / "checkpoints/step-4/mp_rank_00_model_states.pt"
    message = disk_full_message(OSError(errno.ENOSPC, "No space left on device", str(target)), tmp_path)
    assert message is not None and "disk is full" in message and str(target) in message and "free" in message
    quota = disk_full_message(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert quota is not None and str(tmp_path) in quota and "quota" in quota
    assert disk_full_message(OSError(errno.ENOENT, "No such file"), tmp_path) is None
    assert disk_full_message(ValueError("a user mistake"), tmp_path) is None

    # torch.save reports a full disk as a RuntimeError without an errno: judged by the free space left.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert disk_full_message(torch_error, tmp_path) is None  # plenty of space here: some other fault
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096)
    )
    message = disk_full_message(torch_error, tmp_path)
    assert (
        message is not None
        and "disk is full" in message
        and str(tmp_path) in message
        and "unexpected pos" in message
    )
    monkeypatch.setattr(shutil, "disk_usage", lambda path: (_ for _ in ()).throw(OSError("no statfs")))
    message = disk_full_message(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert message is not None and "disk is full" in message  # without the free space


def test_launch_names_a_rank_that_failed_without_a_message(tmp_path: Path):
    from bert.pretrain.launch import rank_failure

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "error-rank0.txt").write_text("")  # the disk was full: the rank could not write its message
    message = rank_failure(sorted(logs.glob("error-rank*.txt")))
    assert message.startswith("rank 0 failed without a message") and str(logs / "error-rank0.txt") in message
    assert "rank 0 failed: \n" not in message and not message.startswith("rank 0 failed: ")
    (logs / "error-rank1.txt").write_text("ValueError: bad\n\nTraceback ...")
    assert rank_failure([logs / "error-rank1.txt"]).startswith("rank 1 failed: ValueError: bad")
