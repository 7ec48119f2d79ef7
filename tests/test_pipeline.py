import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import PipelineConfig, run_pipeline

REPO = Path(__file__).resolve().parents[1]


def test_demo_preset_parses_and_names_real_files(shared_data):
    config = PipelineConfig.from_json_file(REPO / "configs/pipeline/demo.json")
    for path in config.corpus + [t[k] for t in config.finetune for k in ("train", "eval")]:
        assert (shared_data / path).exists(), path


def test_bad_config_is_one_clear_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"corpus": ["x"], "shards": {}}))
    result = CliRunner().invoke(app, ["run", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown keys ['shards']" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_a_rerun_skips_every_stage(shared_data, tmp_path):
    config = PipelineConfig(
        corpus=[str(shared_data / "corpus/inaugural")],
        shard={"num_shards": 2, "doc_boundary": "file", "valid_fraction": 0.1},
        vocab={"vocab_size": 1000},
        examples={"max_seq_length": 64},
        pretrain={
            "num_gpus": 1,
            "model_config": "tiny",
            "model_overrides": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
            "micro_batch_size": 8,
            "max_steps": 3,
            "progress_bar": False,
            "tensorboard": False,
        },
        finetune=[
            {
                "task": "cola",
                "train": "cola/train.tsv",
                "eval": "cola/dev.tsv",
                "seeds": [0],
                "epochs": 1,
                "max_train_examples": 64,
                "max_eval_examples": 64,
                "max_seq_length": 32,
                "progress": False,
            }
        ],  # fmt: skip
    )
    out = tmp_path / "run"
    first = run_pipeline(config, shared_data, out)
    assert set(first["timings_s"]) == {"shard", "vocab", "examples", "pretrain", "finetune"}
    assert (out / "pretrain/hf/model.safetensors").exists()
    assert json.loads((out / "pretrain/result.json").read_text())["step"] == 3
    metrics = json.loads((out / "finetune-cola/metrics.json").read_text())
    assert metrics["task"] == "cola" and metrics["metric"] == "mcc" and len(metrics["results"]) == 1
    weights = (out / "pretrain/hf/model.safetensors").stat().st_mtime_ns
    second = run_pipeline(config, shared_data, out)
    assert (out / "pretrain/hf/model.safetensors").stat().st_mtime_ns == weights  # not retrained
    assert second["finetune"] == first["finetune"]
    assert sum(second["timings_s"].values()) < sum(first["timings_s"].values()) / 3
