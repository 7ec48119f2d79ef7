"""The Prefect flow `bert-pipeline` under Prefect's test harness: end to end, cached by manifests, reruns of
exactly the stages a change affects, a deleted stage rebuilt, a failing stage reported and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bert.model import BertConfig, BertForPreTraining

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

STAGE_DIRS = ("corpus", "vocab", "examples", "pretrain", "finetune-cola")


def tiny_pipeline(shared_data: Path, path: Path) -> Path:
    """A preset small enough for a test: 55 speeches, a 1k vocabulary, a 2-layer 32-wide BERT for 3 steps."""
    preset = {
        "name": "tiny-test",
        "corpus": [str(shared_data / "corpus/inaugural")],
        "shard": {"num_shards": 2, "doc_boundary": "file", "valid_fraction": 0.1},
        "vocab": {"vocab_size": 1000},
        "examples": {"max_seq_length": 64},
        "pretrain": {"num_gpus": 1, "model_config": "tiny",
                     "model_overrides": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
                     "micro_batch_size": 8, "max_steps": 3, "progress_bar": False, "tensorboard": False},
        "finetune": [{"task": "cola", "train": "cola/train.tsv", "eval": "cola/dev.tsv", "seeds": [0],
                      "epochs": 1, "max_train_examples": 64, "max_eval_examples": 64, "max_seq_length": 32,
                      "progress": False}],
    }  # fmt: skip
    path.write_text(json.dumps(preset))
    return path


def run_flow(preset: Path, out: Path, shared_data: Path, overrides=(), **kwargs):
    from flows.pipeline import bert_pipeline

    return bert_pipeline(config=str(preset), overrides=list(overrides), out=str(out),
                         shared=str(shared_data.parent), return_state=True, **kwargs)  # fmt: skip


def manifests(out: Path) -> dict[str, tuple[str, int]]:
    """(fingerprint, manifest mtime) per stage directory: a rewritten manifest means the stage ran."""
    result = {}
    for name in STAGE_DIRS:
        path = out / name / "manifest.json"
        result[name] = (json.loads(path.read_text())["fingerprint"], path.stat().st_mtime_ns)
    return result


def task_states(flow_state) -> dict[str, str]:
    """Task run name → state name, for the stage tasks of one flow run (read back from the API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in STAGE_DIRS if before[name] != after[name]}


def test_flow_end_to_end_cached_rerun_and_exact_invalidation(shared_data, tmp_path, monkeypatch):
    preset, out = tiny_pipeline(shared_data, tmp_path / "tiny.json"), tmp_path / "run"

    state = run_flow(preset, out, shared_data)
    assert state.is_completed(), state.message
    summary = state.result()
    assert not any(summary["cached"].values())
    assert (out / "pretrain/hf/model.safetensors").exists()
    metrics = json.loads((out / "finetune-cola/metrics.json").read_text())
    assert metrics["task"] == "cola" and len(metrics["results"]) == 1
    first = manifests(out)
    pretrain_manifest = json.loads((out / "pretrain/manifest.json").read_text())
    assert (
        pretrain_manifest["stats"]["step"] == 3
        and pretrain_manifest["inputs"]["examples"] == first["examples"][0]
    )

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"tiny-test-report", "tiny-test-evaluation", "tiny-test-figures", "pretraining-progress"} <= keys

    # 2. Unchanged: every stage is Cached and no stage function body runs.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage function ran although its stage was complete")

    with monkeypatch.context() as patch:
        for module, name in (("data_prep.shard", "shard_corpus"), ("data_prep.vocab", "train_vocab"),
                             ("data_prep.examples_stage", "generate_examples"),
                             ("bert.pretrain.stage", "run_pretrain_stage"), ("bert.finetune.stage", "main")):  # fmt: skip
            patch.setattr(f"{module}.{name}", must_not_run)
        again = run_flow(preset, out, shared_data)
    assert again.is_completed(), again.message
    assert all(again.result()["cached"].values()) and len(again.result()["cached"]) == 5
    states = task_states(again)
    assert all(states[s] == "Cached" for s in ("shard", "vocab", "examples", "pretrain")), states
    assert manifests(out) == first
    with get_client(sync_client=True) as client:
        reports = sorted(
            (a for a in client.read_artifacts() if a.key == "tiny-test-report"), key=lambda a: a.created
        )
    assert (
        "previous run" not in reports[0].data and "| this run | previous run | change |" in reports[-1].data
    )

    # 3. A masking setting: examples, pretrain and finetune rerun; shard and vocab are untouched.
    masked = run_flow(preset, out, shared_data, ["examples.masked_lm_prob=0.2"])
    assert masked.is_completed(), masked.message
    second = manifests(out)
    assert changed(first, second) == {"examples", "pretrain", "finetune-cola"}
    assert masked.result()["cached"] == {"shard": True, "vocab": True, "examples": False, "pretrain": False,
                                         "finetune-cola": False}  # fmt: skip

    # 4. Only the learning rate: pretrain and finetune rerun.
    lr = run_flow(preset, out, shared_data, ["examples.masked_lm_prob=0.2", "pretrain.lr=3e-4"])
    assert lr.is_completed(), lr.message
    third = manifests(out)
    assert changed(second, third) == {"pretrain", "finetune-cola"}

    # 5. A deleted examples directory is rebuilt (identically, so what follows stays cached).
    import shutil

    shutil.rmtree(out / "examples")
    rebuilt = run_flow(preset, out, shared_data, ["examples.masked_lm_prob=0.2", "pretrain.lr=3e-4"])
    assert rebuilt.is_completed(), rebuilt.message
    assert rebuilt.result()["cached"]["examples"] is False
    fourth = manifests(out)
    assert fourth["examples"][0] == third["examples"][0] and changed(third, fourth) == {"examples"}


def test_a_crashing_rank_fails_the_run_with_its_message_and_the_fixed_run_resumes_there(
    shared_data, tmp_path
):
    preset, out = tiny_pipeline(shared_data, tmp_path / "tiny.json"), tmp_path / "run"
    init = tmp_path / "init"
    init.mkdir()
    config = BertConfig.preset(
        "tiny", vocab_size=1000, hidden_size=32, num_attention_heads=2, intermediate_size=64
    )
    config.to_json_file(init / "config.json")
    (init / "model.safetensors").write_bytes(b"not a safetensors file")
    overrides = [f"pretrain.init_from={init}", "pretrain.model_config=tiny"]

    failed = run_flow(preset, out, shared_data, overrides)
    assert failed.is_failed()
    error = failed.result(raise_on_failure=False)
    assert "rank 0 failed" in str(error), error
    done = manifests_of(out, ("corpus", "vocab", "examples"))

    BertForPreTraining(config).save_pretrained(init)  # the fix: real weights
    fixed = run_flow(preset, out, shared_data, overrides)
    assert fixed.is_completed(), fixed.message
    cached = fixed.result()["cached"]
    assert cached["shard"] and cached["vocab"] and cached["examples"] and not cached["pretrain"]
    assert manifests_of(out, ("corpus", "vocab", "examples")) == done


def manifests_of(out: Path, names) -> dict:
    return {n: (out / n / "manifest.json").stat().st_mtime_ns for n in names}
