import os
import tempfile
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("BERTPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# Prefect reads its settings when first imported: a private home (database, result storage) for this test
# session, no telemetry, and a start-up timeout that a loaded 2-core machine can meet (PREFECT_NOTES.md).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bertpipe-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only sample data (../shared/data); never copied into the repository."""
    data = SHARED / "data"
    if not data.exists():
        pytest.skip(f"sample data not found at {data}; set BERTPIPE_SHARED")
    return data


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole pytest session (9-13 s to start here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


# --- one straight two-rank pretraining run that the resume, resize and multi-node tests compare against ---------


@pytest.fixture(scope="session")
def training_stage(tmp_path_factory) -> tuple[Path, Path]:
    """(a finished examples stage of 256 train / 32 valid examples, a TINY model config without dropout)."""
    from reference import make_reference_stage

    return make_reference_stage(tmp_path_factory.mktemp("training"))


@pytest.fixture(scope="session")
def reference_run(training_stage, tmp_path_factory):
    """Two ranks, ZeRO-2 fp32, global batch 16 (micro 4 × accumulation 2 × 2 ranks), 30 steps, checkpoints every 6."""
    from reference import run_reference

    return run_reference(training_stage, tmp_path_factory.mktemp("reference") / "run")


# --- MLflow: one template registry for the session ---------------------------------------------------------------


@pytest.fixture
def default_mlflow_store(monkeypatch):
    """The registry's own SQLite store, whatever MLFLOW_* the environment names."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """A registry database with MLflow's schema and nothing else, to copy: creating one runs ~50 migrations (5-7 s)."""
    from flows.registry import Registry

    root = tmp_path_factory.mktemp("template")
    Registry(root)._client().search_experiments()
    return root / "registry" / "mlflow.db"
