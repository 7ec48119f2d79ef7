"""The retraining flow `bert-retrain` under Prefect's test harness: a first run makes version 1 champion, new
files are sharded alone (old shards and examples reused untouched), the gate promotes or keeps the champion,
nothing new means nothing trained, rollback, and a run killed in training leaves the registry as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tiny and short: 3 steps of pretraining, fine-tuning on 32 sentences, 64 held-out examples.
FAST = ["pretrain.max_steps=3", "retrain.max_steps=3", "pretrain.micro_batch_size=8",
        "finetune.max_train_examples=32", "finetune.max_eval_examples=32", "retrain.heldout_examples=64"]  # fmt: skip
REJECT = ["gate.mlm_loss_tolerance=-0.99"]  # the loss would have to fall by 99%: never holds
PROMOTE = ["gate.mlm_loss_tolerance=10", "gate.finetune_tolerance=10"]  # always holds


def run_retrain(corpus: Path, root: Path, shared_data: Path, overrides=()):
    from flows.retrain import retrain

    return retrain(config="retrain-demo", overrides=[f"corpus={corpus}", *FAST, *overrides], out=str(root),
                   shared=str(shared_data.parent), return_state=True)  # fmt: skip


def data_manifests(root: Path) -> dict[str, tuple[str, int]]:
    """(fingerprint, manifest mtime) of every shard, vocab and examples directory under ROOT/data."""
    found = {}
    for path in sorted((root / "data").glob("*/manifest.json")):
        found[path.parent.name] = (json.loads(path.read_text())["fingerprint"], path.stat().st_mtime_ns)
    return found


def add_files(corpus: Path, sources: list[Path]) -> None:
    for source in sources:
        shutil.copy(source, corpus / source.name)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_retrain_first_run_new_data_gate_both_ways_nothing_new_rollback_and_a_killed_run(
    shared_data, tmp_path, monkeypatch
):
    from flows.registry import Registry

    speeches = sorted((shared_data / "corpus/inaugural").glob("*.txt"))
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    corpus.mkdir()
    add_files(corpus, speeches[:30])
    registry = Registry(root)

    # 1. Empty registry: trained from scratch, version 1 is champion.
    first = run_retrain(corpus, root, shared_data)
    assert first.is_completed(), first.message
    summary = first.result()
    assert summary["decision"] == "promoted" and summary["version"] == 1
    assert registry.champion().version == 1 and registry.champion().lineage["parent_version"] == ""
    assert len(summary["new_files"]) == 30 and summary["challenger_metrics"]["heldout_mlm_loss"] > 0

    # 2. Nothing new: no run directory, no training, nothing registered.
    runs_before = sorted(p.name for p in (root / "runs").iterdir())
    idle = run_retrain(corpus, root, shared_data)
    assert idle.is_completed(), idle.message
    assert idle.result()["decision"] == "nothing-new"
    assert sorted(p.name for p in (root / "runs").iterdir()) == runs_before
    assert [v.version for v in registry.versions()] == [1]

    # 3. Five new speeches, and the run is killed in training: the registry and the champion are unchanged.
    before = data_manifests(root)
    add_files(corpus, speeches[30:35])

    def killed(*args, **kwargs):
        raise RuntimeError("killed in training")

    with monkeypatch.context() as patch:
        patch.setattr("bert.pretrain.stage.run_pretrain_stage", killed)
        failed = run_retrain(corpus, root, shared_data)
    assert failed.is_failed()
    assert [v.version for v in registry.versions()] == [1] and registry.champion().version == 1
    after = data_manifests(root)
    assert {k: after[k] for k in before} == before  # old shards, vocab and examples: not rewritten
    new_dirs = sorted(set(after) - set(before))
    assert [d.split("-")[0] for d in new_dirs] == ["examples", "shards"], new_dirs  # the new batch only

    # 4. The next run completes: the killed run's batch reused, version 2 trained from version 1, and with a
    # gate that cannot hold, registered but not promoted.
    rejected = run_retrain(corpus, root, shared_data, REJECT)
    assert rejected.is_completed(), rejected.message
    summary = rejected.result()
    assert summary["decision"] == "rejected" and summary["version"] == 2, summary
    assert "heldout_mlm_loss" in summary["reason"]
    assert len(summary["new_files"]) == 5 and summary["new_data"]["documents"] == 5
    assert data_manifests(root) == after
    v2 = registry.get(2)
    assert v2.lineage["parent_version"] == "1" and "champion" not in v2.aliases
    assert registry.champion().version == 1
    train_config = json.loads((Path(v2.lineage["run_dir"]) / "pretrain/train_config.json").read_text())
    assert train_config["init_from"] == str(registry.get(1).hf_dir)
    assert summary["mix"]["old_rows"] > 0 and summary["mix"]["new_rows"] > 0

    # 5. The same new data with a gate that holds: nothing re-sharded or regenerated, version 3 promoted.
    # With a lift requirement any lift meets: the lift over random init is measured even where CoLA's seeds
    # predict one class at this size (they count at the MCC they measured); a missing lift would fail.
    promoted = run_retrain(corpus, root, shared_data, [*PROMOTE, "gate.min_lift=-1"])
    assert promoted.is_completed(), promoted.message
    summary = promoted.result()
    assert summary["decision"] == "promoted" and summary["version"] == 3, summary
    assert isinstance(summary["challenger_metrics"]["cola_mcc_lift"], float), summary
    assert data_manifests(root) == after
    assert registry.champion().version == 3 and registry.get(3).lineage["parent_version"] == "1"

    # 6. Rollback restores the previous champion.
    assert registry.rollback().version == 1 and registry.champion().version == 1

    # The markdown artifact of the last run says what was new and why it was promoted.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        reports = [a for a in client.read_artifacts() if a.key == "retrain-demo-retrain"]
    assert any("## What was new" in a.data and "Version 3 promoted" in a.data for a in reports)


def test_gate_decision_checks_every_metric():
    from flows.retrain_plan import GateRule, gate_decision

    rule = GateRule(mlm_loss_tolerance=0.05, finetune={"cola": "mcc"})
    champion = {"heldout_mlm_loss": 4.0, "cola_mcc": 0.10}
    assert gate_decision(rule, champion, {"heldout_mlm_loss": 4.19, "cola_mcc": 0.10})["promote"]
    worse = gate_decision(rule, champion, {"heldout_mlm_loss": 4.21, "cola_mcc": 0.2})
    assert not worse["promote"] and "heldout_mlm_loss" in worse["reason"]
    lower = gate_decision(rule, champion, {"heldout_mlm_loss": 3.0, "cola_mcc": 0.05})
    assert not lower["promote"] and "cola_mcc" in lower["reason"]
    # every seed degenerate on both sides: no regression to report
    assert gate_decision(rule, {"heldout_mlm_loss": 4.0}, {"heldout_mlm_loss": 4.0})["promote"]
    assert not gate_decision(rule, champion, {"heldout_mlm_loss": 4.0})["promote"]


def test_new_files_and_batches_by_content():
    from flows.retrain_plan import assign_batches, new_files

    seen = {"a.txt": "h1", "b.txt": "h2"}
    new, changed = new_files({"a.txt": "h1", "b.txt": "h3", "c.txt": "h2", "d.txt": "h4"}, seen)
    assert new == {"b.txt": "h3", "d.txt": "h4"} and changed == ["b.txt"]  # c.txt: b's old content, moved
    earlier = assign_batches({"d.txt": "h4"}, [], {"seed": 0})
    both = assign_batches(new, earlier, {"seed": 0})
    assert both[0] == earlier[0] and both[1]["files"] == {"b.txt": "h3"}


def test_the_mix_takes_every_new_part_and_a_seeded_sample_of_old_ones():
    from flows.retrain_plan import plan_mix

    new = [(Path("new"), {"path": f"train/{i}.arrow", "rows": 10}) for i in range(3)]
    old = [(Path("old"), {"path": f"train/{i}.arrow", "rows": 10}) for i in range(10)]
    parts, figures = plan_mix(new, old, new_fraction=0.75, seed=0)
    assert parts[:3] == new and len(parts) == 4 and parts[3][0] == Path("old")
    assert figures == {"new_rows": 30, "old_rows": 10, "old_parts": 1, "old_parts_available": 10}
    assert plan_mix(new, old, 0.75, seed=0) == (parts, figures)  # the same seed, the same sample
    assert plan_mix(new, old, 1.0, seed=0)[1]["old_rows"] == 0
    assert plan_mix(new, old, 0.1, seed=0)[1]["old_rows"] == 100  # all the old rows there are


def test_prefect_yaml_schedules_are_ones_prefect_deploy_accepts():
    """The cheap check beside tests/test_deployment.py: prefect.yaml through Prefect's own deploy models."""
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(raw)
    retrain = [d for d in raw["deployments"] if d["entrypoint"] == "flows/retrain.py:retrain"]
    assert len(retrain) == 1 and retrain[0]["concurrency_limit"]["limit"] == 1
    for schedule in retrain[0]["schedules"]:
        RawScheduleConfig.model_validate(schedule)  # unknown keys are refused
        created = DeploymentScheduleCreate(**_schedule_config_to_deployment_schedule(schedule))
        assert created.active is False and created.slug and created.schedule.cron


def test_gate_min_lift_keeps_out_a_model_that_learned_nothing():
    from flows.retrain_plan import GateRule, gate_decision

    rule = GateRule(
        finetune={"sst2": "accuracy"}, min_lift=0.02, mlm_loss_tolerance=10, finetune_tolerance=10
    )
    champion = {"heldout_mlm_loss": 4.0, "sst2_accuracy": 0.70}
    kept = {"heldout_mlm_loss": 4.0, "sst2_accuracy": 0.75, "sst2_accuracy_lift": 0.05}
    assert gate_decision(rule, champion, kept)["promote"]
    lost = gate_decision(rule, champion, {**kept, "sst2_accuracy_lift": 0.01})
    assert (
        not lost["promote"] and "sst2_accuracy_lift 0.0100 (needs ≥ 0.02 over random init)" in lost["reason"]
    )
    # the first model too, and a lift that could not be measured fails
    assert not gate_decision(rule, None, {**kept, "sst2_accuracy_lift": -0.03})["promote"]
    assert not gate_decision(rule, None, {"heldout_mlm_loss": 4.0, "sst2_accuracy": 0.75})["promote"]
    first = gate_decision(rule, None, kept)
    assert first["promote"] and [c["metric"] for c in first["checks"]] == ["sst2_accuracy_lift"]
    assert gate_decision(GateRule(finetune={"sst2": "accuracy"}), None, {})[
        "promote"
    ]  # no min_lift: as before
    with pytest.raises(ValueError, match="gate.finetune"):
        GateRule(min_lift=0.02)
