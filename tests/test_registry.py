"""The model registry (flows/registry.py) and `bertpipe models`: versions, champion, rollback, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.registry import HISTORY_TAG, Registry

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("default_mlflow_store")]  # MLflow: seconds a registry


def fake_export(path: Path, tag: str) -> Path:
    """The registry only copies the directory: a config.json and one small weight file stand in for a model."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16, "tag": tag}))
    (path / "model.safetensors").write_bytes(tag.encode() * 64)
    return path


@pytest.fixture
def root(tmp_path, empty_db) -> Path:
    (tmp_path / "run" / "registry").mkdir(parents=True)
    shutil.copy(empty_db, tmp_path / "run" / "registry" / "mlflow.db")
    return tmp_path / "run"


@pytest.fixture
def two_versions(root, tmp_path) -> Registry:
    registry = Registry(root)
    for n, loss in ((1, 2.5), (2, 2.4)):
        lineage = {"corpus": f"c{n}", "vocab": "v", "examples": f"e{n}", "pretrain": f"p{n}",
                   "parent_version": "" if n == 1 else "1", "flow_run_id": f"run-{n}"}  # fmt: skip
        registry.register(fake_export(tmp_path / f"hf{n}", f"m{n}"), {"mlm_loss": loss}, lineage)
    return registry


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["models", *args])
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str, contains: str) -> None:
    result = CliRunner().invoke(app, ["models", *args])
    assert result.exit_code == 2, result.output
    assert contains in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_register_does_not_promote_and_rollback_restores_the_previous_champion(two_versions):
    registry = two_versions
    assert [v.version for v in registry.versions()] == [1, 2]
    assert registry.champion() is None  # registering never touches the champion
    assert registry.get(2).metrics == {"mlm_loss": 2.4}
    assert registry.get(2).lineage["parent_version"] == "1"
    assert registry.get(2).lineage["flow_run_id"] == "run-2"

    assert registry.promote(1, reason="first model").aliases == ["champion"]
    promoted = registry.promote(2, reason="lower MLM loss")
    assert promoted.aliases == ["champion"] and promoted.tags["champion_reason"] == "lower MLM loss"
    assert registry.get(1).aliases == ["previous-champion"]

    restored = registry.rollback()
    assert restored.version == 1 and registry.champion().version == 1
    assert registry.get(2).aliases == []
    with pytest.raises(ValueError, match="no previous champion"):
        registry.rollback()


def test_a_second_registry_object_sees_the_same_state(two_versions, root):
    two_versions.promote(2)
    other = Registry(root)
    assert [v.version for v in other.versions()] == [1, 2]
    assert other.champion().version == 2
    other.promote(1)
    assert two_versions.champion().version == 1


def test_hf_dir_of_a_version_is_a_usable_copy(two_versions, tmp_path):
    shutil.rmtree(tmp_path / "hf1")  # the registry holds its own copy
    hf_dir = two_versions.get(1).hf_dir
    assert json.loads((hf_dir / "config.json").read_text())["tag"] == "m1"
    assert (hf_dir / "model.safetensors").read_bytes() == b"m1" * 64
    assert str(hf_dir).startswith(str(two_versions.local_dir / "artifacts"))


def test_unknown_versions_and_an_empty_registry_raise_value_error(root, tmp_path):
    registry = Registry(tmp_path / "nothing-here")
    assert registry.versions() == [] and registry.champion() is None
    with pytest.raises(ValueError, match="holds no versions"):
        registry.get(1)
    with pytest.raises(ValueError, match="no champion"):
        registry.rollback()
    assert not (tmp_path / "nothing-here").exists()  # reading never creates a database
    with pytest.raises(ValueError, match="no config.json"):
        Registry(root).register(tmp_path, {}, {})


def test_a_register_killed_midway_leaves_no_version_and_the_champion_unchanged(two_versions, tmp_path):
    two_versions.promote(1)
    client = two_versions._client()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGINT does in the middle of the upload

    original, client.log_artifacts = client.log_artifacts, killed
    try:
        with pytest.raises(KeyboardInterrupt):
            two_versions.register(fake_export(tmp_path / "hf3", "m3"), {"mlm_loss": 1.0}, {"corpus": "c3"})
    finally:
        client.log_artifacts = original
    assert [v.version for v in two_versions.versions()] == [1, 2]
    assert two_versions.champion().version == 1


def test_a_kill_between_history_and_alias_does_not_corrupt_rollback(two_versions):
    two_versions.promote(1)
    # promote(2) killed after writing the history, before moving the alias: the alias (1) wins
    two_versions._client().set_registered_model_tag("bertpipe-bert", HISTORY_TAG, "[1, 2]")
    assert two_versions.champion().version == 1
    with pytest.raises(ValueError, match="no previous champion"):
        two_versions.rollback()
    two_versions.promote(2)
    assert two_versions.rollback().version == 1


def test_cli_list_show_promote_rollback(two_versions, root):
    lines = cli("list", "--json", "--root", str(root)).strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["version"] for r in records] == [1, 2]
    for r in records:
        assert {"version", "aliases", "metrics", "lineage"} <= r.keys()
    assert records[1]["metrics"] == {"mlm_loss": 2.4} and records[1]["lineage"]["corpus"] == "c2"

    assert "is champion" in cli("promote", "1", "--reason", "baseline", "--root", str(root))
    assert "version 2 is champion (was version 1)" in cli("promote", "2", "--root", str(root))
    table = cli("list", "--root", str(root)).splitlines()
    assert table[0].split()[:2] == ["version", "aliases"] and "mlm_loss" in table[0]
    assert table[2].split()[:2] == ["2", "champion"] and table[1].split()[:2] == ["1", "previous-champion"]

    shown = json.loads(cli("show", "1", "--root", str(root)))
    assert shown["tags"]["champion_reason"] == "baseline"
    assert (Path(shown["hf_dir"]) / "config.json").is_file()
    assert "version 1 is champion again (was version 2)" in cli("rollback", "--root", str(root))
    assert json.loads(cli("list", "--json", "--root", str(root)).splitlines()[0])["aliases"] == ["champion"]


def test_cli_errors_are_one_line(two_versions, root, tmp_path):
    refused("show", "9", "--root", str(root), contains="has no version 9")
    refused("promote", "9", "--root", str(root), contains="versions: 1, 2")
    refused("rollback", "--root", str(root), contains="no champion")
    cli("promote", "1", "--root", str(root))
    refused("rollback", "--root", str(root), contains="no previous champion")
    empty = str(tmp_path / "empty")
    refused("list", "--root", empty, contains="holds no versions")
    refused("show", "1", "--root", empty, contains="holds no versions")
    refused("promote", "1", "--root", empty, contains="holds no versions")
    refused("rollback", "--root", empty, contains="no champion")


def test_mlflow_tracking_uri_is_honoured(monkeypatch, tmp_path, empty_db):
    elsewhere = tmp_path / "server"
    elsewhere.mkdir()
    shutil.copy(empty_db, elsewhere / "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere / 'other.db'}")
    registry = Registry(tmp_path / "run")
    version = registry.register(fake_export(tmp_path / "hf", "x"), {"mlm_loss": 3.0}, {"corpus": "c"})
    assert not (tmp_path / "run").exists()  # nothing under the run root
    assert str(version.hf_dir).startswith(str(elsewhere / "artifacts"))
    assert Registry(tmp_path / "another-root").get(1).metrics == {"mlm_loss": 3.0}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert Registry(tmp_path / "run").versions() == []
