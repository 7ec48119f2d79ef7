"""Pretraining and fine-tuning are stages too: a fingerprint known before they run, a manifest when complete,
and a re-run that does nothing, resumes, or starts over exactly when it should."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_data import make_examples, make_vocab
from test_finetune import tiny_model  # noqa: F401  (a module fixture: a 2-layer random BERT)

from bert.finetune import FinetuneConfig, main
from bert.finetune import stage as finetune_stage
from bert.finetune.stage import expected_fingerprint
from bert.pretrain import stage as P
from bert.pretrain.config import TrainConfig
from data_prep.manifest import INPROGRESS, StageError, read_manifest


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage")
    return make_examples(root / "examples", make_vocab(root / "vocab"))


def train_config(examples: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(examples=str(examples), out=str(out), model_config="tiny", micro_batch_size=4, max_steps=10,
                  schedule_steps=100, lr=1e-3, model_overrides={"hidden_size": 32, "num_attention_heads": 2})  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_pretrain_fingerprint_follows_what_decides_the_weights(examples, tmp_path):
    base = train_config(examples, tmp_path / "a")
    fp = P.expected_fingerprint(base)
    same = [dict(out=str(tmp_path / "b")), dict(save_every=5, eval_every=2, progress_bar=False, keep_last=9),
            dict(log_example_indices=True, tensorboard=False), dict(profile_steps="2:4", compile=True)]  # fmt: skip
    for change in same:
        assert P.expected_fingerprint(dataclasses.replace(base, **change)) == fp, change
    for change in (dict(lr=2e-3), dict(max_steps=20), dict(seed=1), dict(micro_batch_size=2),
                   dict(model_overrides={"hidden_size": 64, "num_attention_heads": 2}),
                   dict(deepspeed_config=str(Path(__file__).parents[1] / "deepspeed_configs/zero2_fp32.json"))):  # fmt: skip
        assert P.expected_fingerprint(dataclasses.replace(base, **change)) != fp, change
    # max_steps changes the result, not the trajectory: a run may be extended when its schedule is fixed
    longer = dataclasses.replace(base, max_steps=20)
    assert P.trajectory(P.stage_config(base), P.stage_inputs(base)) == P.trajectory(
        P.stage_config(longer), P.stage_inputs(longer)
    )


def fake_checkpoint(out: Path) -> None:
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-4")


def test_pretrain_resumes_same_trajectory_refuses_or_restarts_another(examples, tmp_path):
    out = tmp_path / "run"
    config, manifest = P.prepare(train_config(examples, out))
    assert manifest is None and config.resume is False
    assert json.loads((out / INPROGRESS).read_text())["config"]["lr"] == 1e-3
    fake_checkpoint(out)
    longer, _ = P.prepare(train_config(examples, out, max_steps=30))  # same trajectory: continue
    assert longer.resume is True
    with pytest.raises(StageError, match=r"other settings \(lr: 0\.001 → 0\.002"):
        P.prepare(train_config(examples, out, lr=2e-3), resume=True)  # the CLI: refuse
    zero2 = str(Path(__file__).parents[1] / "deepspeed_configs/zero2_fp32.json")
    with pytest.raises(StageError, match=r"other settings \(the DeepSpeed JSON's settings changed\)"):
        P.prepare(train_config(examples, out, deepspeed_config=zero2), resume=True)  # an input, not a setting
    with pytest.raises(StageError, match="pass --resume"):
        P.prepare(train_config(examples, out), resume=False)
    restarted, _ = P.prepare(
        train_config(examples, out, lr=2e-3)
    )  # the pipeline: its own directory, start over
    assert restarted.resume is False and not (out / "checkpoints").exists()


def test_finetune_writes_a_manifest_and_a_rerun_trains_nothing(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    rows = [f"src\t{i % 2}\t\tthe {'broncos won' if i % 2 else 'game of'} the game {i}" for i in range(24)]
    train.write_text("\n".join(rows) + "\n")
    dev.write_text("\n".join(rows[:8]) + "\n")
    config = FinetuneConfig(task="cola", model=tiny_model, out=tmp_path / "out", train=train, eval=dev,
                              seeds=(0,), epochs=1, batch_size=8, lr=1e-3, max_seq_length=32, progress=False)  # fmt: skip
    first = main(config)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["stage"] == "finetune" and manifest["fingerprint"] == expected_fingerprint(config)
    assert "metrics.json" in {f["path"] for f in manifest["files"]}

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained again although the stage was complete")

    monkeypatch.setattr(finetune_stage, "train_seed", must_not_train)
    assert main(config) == json.loads(json.dumps(first))
    # another setting, or edited data, is another fingerprint: the stage runs again
    assert expected_fingerprint(dataclasses.replace(config, lr=2e-3)) != manifest["fingerprint"]
    assert (
        expected_fingerprint(dataclasses.replace(config, num_threads=1, progress=True))
        == manifest["fingerprint"]
    )
    train.write_text("\n".join(rows[:20]) + "\n")
    assert expected_fingerprint(config) != manifest["fingerprint"]
    with pytest.raises(AssertionError, match="trained again"):
        main(config)


def test_a_second_trainer_on_a_run_directory_is_refused_before_any_launch(examples, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from data_prep.manifest import acquire_writer_lock; "
         f"acquire_writer_lock({str(out)!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=rf"being written by pid {holder.pid}"):
            P.run_pretrain_stage(train_config(examples, out), num_gpus=1)
        assert not (out / INPROGRESS).exists()  # refused before it touched anything
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
