"""A damaged or missing registry and a champion without its artifact: refused in one line, never re-created
over, never a silent start from scratch; `bertpipe models rebuild` restores versions, champion and promotion
history from the run directories (ROOT/runs/<n>: weights and run record), as the retraining flow writes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data_prep.manifest import begin_stage, file_entry, read_json, write_json_atomic
from flows.cli import app
from flows.registry import Registry
from flows.retrain_plan import RUN_RECORD, evaluated_record, run_record

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("default_mlflow_store")]  # MLflow: seconds a registry


@pytest.fixture
def root(tmp_path, empty_db) -> Path:
    (tmp_path / "root" / "registry").mkdir(parents=True)
    shutil.copy(empty_db, tmp_path / "root" / "registry" / "mlflow.db")
    return tmp_path / "root"


def fake_run(root: Path, n: int, promote: bool, parent: int | None, loss: float) -> Path:
    """ROOT/runs/<n> as the retraining flow leaves it once evaluated: a complete pretrain stage with its HF
    export (a stand-in model) and the run record written before registering."""
    run_dir = root / "runs" / str(n)
    stage = begin_stage(run_dir / "pretrain", "pretrain", {"run": n}, {}, 1)
    hf = run_dir / "pretrain" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16, "run": n}))
    (hf / "model.safetensors").write_bytes(f"weights of run {n}".encode() * 32)
    stage.commit(
        [file_entry(run_dir / "pretrain", f"hf/{p.name}") for p in sorted(hf.iterdir())], {"step": 3}
    )
    decision = {"promote": promote, "checks": [], "reason": "gate held" if promote else "kept the champion"}
    record = run_record(None, {f"/corpus/{n}.txt": f"sha{n}"}, [f"batch{n}"], str(root / "data/vocab-x"),
                        root / "data/examples-1", {"unk_tokens": 1, "tokens": 100}, parent, decision)  # fmt: skip
    lineage = {"corpus": f"c{n}", "vocab": "v", "examples": f"e{n}", "pretrain": f"p{n}", "batches": f"batch{n}",
               "parent_version": "" if parent is None else str(parent), "run_dir": str(run_dir),
               "flow_run_id": f"flow-{n}"}  # fmt: skip
    write_json_atomic(run_dir / RUN_RECORD, evaluated_record(record, {"heldout_mlm_loss": loss}, lineage))
    return run_dir


def register_run(registry: Registry, run_dir: Path) -> int:
    """What the flow does after evaluation: register the run's export, note the version, promote if the gate held."""
    record = read_json(run_dir / RUN_RECORD)
    version = registry.register(run_dir / "pretrain/hf", record["metrics"], record["lineage"]).version
    write_json_atomic(run_dir / RUN_RECORD, {**read_json(run_dir / RUN_RECORD), "version": version})
    if record["decision"]["promote"]:
        registry.promote(version, record["decision"]["reason"])
    return version


@pytest.fixture
def three_runs(root) -> Registry:
    """Run 1 promoted (first model), run 2 rejected by the gate and promoted by hand, run 3 promoted, then a
    rollback to 2: versions 1-3, champion 2, history [1, 2]."""
    registry = Registry(root)
    for n, promote, loss in ((1, True, 3.0), (2, False, 2.9), (3, True, 2.8)):
        register_run(registry, fake_run(root, n, promote, parent=None if n == 1 else 1, loss=loss))
        if n == 2:
            registry.promote(2, reason="by hand")
    registry.rollback(reason="3 was worse on our task")
    return registry


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_refusal(result, *contains: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for text in contains:
        assert text in result.output, result.output
    return result.output


def state(registry: Registry) -> dict:
    """What a user sees of a registry: each version's metrics, lineage and aliases, and the champion history."""
    return {
        "versions": [(v.version, v.metrics, v.lineage, v.aliases) for v in registry.versions()],
        "history": registry._history(),
    }


# --- a damaged registry is refused, never re-created over -------------------------------------------------


def damaged_bytes(kind: str, empty_db: Path) -> bytes:
    if kind == "empty":
        return b""
    if kind == "garbage":
        return b"these are not the bytes of a database\n" * 100
    if kind == "truncated":  # a real registry cut short: the header is right, the pages are not all there
        return empty_db.read_bytes()[: 3 * 4096 + 100]
    assert kind == "not-mlflow"  # SQLite, but not MLflow's
    import sqlite3

    other = empty_db.parent / "other.db"
    other.unlink(missing_ok=True)
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    data = other.read_bytes()
    other.unlink()
    return data


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "not-mlflow"])
def test_a_damaged_registry_is_refused_in_one_line_and_left_byte_for_byte(kind, root, empty_db):
    db = root / "registry" / "mlflow.db"
    db.write_bytes(damaged_bytes(kind, empty_db))
    before = db.read_bytes()
    for command in (["list"], ["list", "--json"], ["show", "1"], ["promote", "1"], ["rollback"]):
        one_line_refusal(invoke("models", *command, "--root", str(root)), str(db), "models rebuild")
    one_line_refusal(invoke("retrain", "--out", str(root)), str(db), "models rebuild")
    from flows.retrain import open_champion

    with pytest.raises(ValueError, match="cannot be read"):
        open_champion(root)
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # no journal, no new file
    assert not (root / "runs").exists()  # nothing started


def test_a_missing_registry_with_earlier_runs_refuses_to_start_from_scratch(tmp_path):
    root = tmp_path / "root"
    for n in (1, 2):
        fake_run(root, n, promote=True, parent=None if n == 1 else 1, loss=3.0 - n / 10)
    (root / "runs" / "3").mkdir()  # a run killed in training: no record, not counted
    one_line_refusal(invoke("retrain", "--out", str(root)), "holds 2 earlier runs but no registry",
                     f"bertpipe models rebuild --root {root}")  # fmt: skip
    one_line_refusal(invoke("models", "list", "--root", str(root)), "holds no versions", "models rebuild")
    assert not (root / "registry").exists()  # neither reading nor refusing creates one
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["1", "2", "3"]


# --- rebuild from the run directories -------------------------------------------------------------------------


def test_rebuild_restores_versions_champion_and_history_after_the_database_is_lost(three_runs, root):
    expected = state(three_runs)
    assert expected["history"] == [1, 2] and three_runs.champion().version == 2
    (root / "runs" / "4").mkdir()  # a run killed in training: no record, no weights
    db = root / "registry" / "mlflow.db"
    db.write_bytes(b"")  # truncated to nothing

    result = invoke("models", "rebuild", "--root", str(root))
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()  # what the user reads; logging goes to stderr
    assert [line for line in lines if line.startswith("version ")] == [
        line for line in lines if "runs/1" in line or "runs/2" in line or "runs/3" in line
    ]
    assert sum(line.startswith("version ") for line in lines) == 3, result.output
    assert any("runs/4" in line and "skipped" in line for line in lines), result.output
    assert "champion: version 2" in lines[-1] and "3 versions" in lines[-1], result.output

    damaged = [p for p in db.parent.iterdir() if p.name.startswith("mlflow.db.damaged-")]
    assert len(damaged) == 1 and damaged[0].read_bytes() == b""  # moved aside, never deleted
    rebuilt = Registry(root)
    assert state(rebuilt) == expected
    assert rebuilt.get(2).tags["champion_reason"] == "rollback from version 3: 3 was worse on our task"
    hf = rebuilt.champion().hf_dir
    assert (hf / "model.safetensors").read_bytes() == (
        root / "runs/2/pretrain/hf/model.safetensors"
    ).read_bytes()
    assert rebuilt.rollback().version == 1  # the history is usable, not only shown


def test_rebuild_of_legacy_records_takes_the_newest_run_that_passed_its_gate(tmp_path):
    """Records written before promotions were recorded: no metrics/lineage keys, the figures in the summary."""
    root = tmp_path / "root"
    for n, promote in ((1, True), (2, True), (3, False)):
        run_dir = fake_run(root, n, promote, parent=None if n == 1 else 1, loss=3.0)
        record = read_json(run_dir / RUN_RECORD)
        legacy = {k: v for k, v in record.items() if k not in ("metrics", "lineage", "promotions")}
        summary = {"challenger_metrics": {"heldout_mlm_loss": 3.0 - n / 10}, "flow_run_id": f"flow-{n}"}
        write_json_atomic(run_dir / RUN_RECORD, {**legacy, "version": n, "summary": summary})
    result = invoke("models", "rebuild", "--root", str(root))
    assert result.exit_code == 0, result.output
    registry = Registry(root)
    assert [v.version for v in registry.versions()] == [1, 2, 3]
    assert registry.champion().version == 2 and registry._history() == [1, 2]
    assert registry.get(3).metrics == {"heldout_mlm_loss": pytest.approx(2.7)}
    assert registry.get(3).lineage["parent_version"] == "1"
    assert registry.get(3).lineage["run_dir"] == str(root / "runs" / "3")


def test_rebuild_refuses_a_readable_registry_and_a_root_without_runs(three_runs, root, tmp_path):
    before = state(three_runs)
    one_line_refusal(invoke("models", "rebuild", "--root", str(root)), "holds 3 versions", "--force")
    assert state(Registry(root)) == before
    one_line_refusal(invoke("models", "rebuild", "--root", str(tmp_path / "nothing")), "no run")
    assert not (tmp_path / "nothing" / "registry").exists()


# --- the champion's artifact is missing ----------------------------------------------------------------------


def test_a_champion_without_its_artifact_is_refused_before_any_training(root):
    registry = Registry(root)
    register_run(registry, fake_run(root, 1, promote=True, parent=None, loss=3.0))
    hf_dir = registry.champion().hf_dir
    shutil.rmtree(hf_dir)
    output = one_line_refusal(
        invoke("retrain", "--out", str(root)),
        "champion's artifact (version 1) is missing",
        str(hf_dir),
        str(root / "runs/1/pretrain/hf"),
    )
    assert "--init-from" not in output
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["1"]  # no run directory made
