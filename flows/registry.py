"""The model registry: versions of the pretrained model on MLflow's Model Registry, one of them the champion.

Each version is one MLflow run of the experiment ``NAME``: the lineage (corpus, vocab, examples and pretraining
fingerprints, parent version, flow run id, ...) as its parameters, the evaluation figures as its metrics and the
Hugging Face export as its artifact ``hf/``; the registered model ``NAME`` gets a version made from that run.
By default the store is a SQLite database ``ROOT/registry/mlflow.db`` with artifacts in
``ROOT/registry/artifacts``; ``MLFLOW_TRACKING_URI`` points it at any MLflow server or database instead.

Crash safety. Registering and promoting are separate steps, and only :meth:`Registry.promote` (and
:meth:`Registry.rollback`) move the alias ``champion``. :meth:`Registry.register` uploads the whole export and
ends the run before it creates the version, so a version always has its complete artifact; a run killed before
that leaves at most an orphan MLflow run, which no version refers to. A run killed anywhere leaves the champion
as it was, because the alias is one row that MLflow sets in one transaction. Promotion history (for rollback) is
a tag of the registered model written before the alias moves and read against the alias, so a kill between the
two is harmless. Two processes promoting at the same moment are not guarded against: retraining runs one at a
time (the deployment's concurrency limit).

Only ``flows/`` imports mlflow, and only inside these methods: importing this module costs nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = (
    "previous-champion"  # a mirror of the history, for the MLflow UI and `models:/NAME@previous-champion`
)
HISTORY_TAG = "bertpipe.champion_history"  # JSON list of versions, oldest first: what rollback walks back
MAX_HISTORY = 200  # promotions remembered; far more rollbacks than anyone makes, far below the tag size limit
ARTIFACT = "hf"  # the artifact path of the HF export inside each run


@dataclass
class ModelVersion:
    """One registered version: its metrics, its lineage and a local directory holding its HF export."""

    version: int
    aliases: list[str]
    metrics: dict[str, float]
    lineage: dict[
        str, str
    ]  # corpus, vocab, examples and pretraining fingerprints, parent version, flow run id
    hf_dir: Path  # a local directory holding the HF export (downloaded from the artifact store if needed)
    created_at: str
    tags: dict[str, str] = field(default_factory=dict)  # the version's tags, e.g. champion_reason
    run_id: str = ""  # the MLflow run that holds the lineage, metrics and artifact

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return {
            "version": self.version,
            "aliases": list(self.aliases),
            "metrics": dict(self.metrics),
            "lineage": dict(self.lineage),
            "hf_dir": str(self.hf_dir),
            "created_at": self.created_at,
            "tags": dict(self.tags),
            "run_id": self.run_id,
        }


class Registry:
    """The versions of the registered model ``name``: register, list, promote to champion, roll back."""

    def __init__(self, root: str | os.PathLike, name: str = "bertpipe-bert"):
        self.root = Path(root).resolve()
        self.name = name
        self.local_dir = self.root / "registry"
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = env_uri or f"sqlite:///{self.local_dir / 'mlflow.db'}"
        self.registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or self.uri
        self._default_store = not env_uri
        self._client_obj = None

    def __repr__(self) -> str:
        return f"Registry({self.name!r} at {self.uri})"

    # --- reading --------------------------------------------------------------------------------------------

    def versions(self, download: bool = True) -> list[ModelVersion]:
        """Every version, oldest first. ``download=False``: do not fetch remote exports (hf_dir is then where
        the export will be once fetched; a local artifact store always has it in place)."""
        if not self._may_exist():
            return []
        aliases = self._aliases()
        if aliases is None:
            return []
        client = self._client()
        found = client.search_model_versions(f"name = '{_quote(self.name)}'")
        found = sorted(found, key=lambda mv: int(mv.version))
        return [self._version(mv, aliases, download) for mv in found]

    def get(self, version: int) -> ModelVersion:
        """Version ``version``; ValueError (one line) if the registry has no such version."""
        from mlflow.exceptions import MlflowException

        aliases = self._aliases() if self._may_exist() else None
        if aliases is None:
            raise ValueError(f"the registry {self.uri} holds no versions of {self.name} yet")
        try:
            mv = self._client().get_model_version(self.name, str(int(version)))
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            known = [v.version for v in self.versions(download=False)]
            raise ValueError(
                f"{self.name} has no version {version} in {self.uri} (versions: {_span(known)})"
            ) from None
        return self._version(mv, aliases, download=True)

    def champion(self) -> ModelVersion | None:
        """The version with the alias ``champion``, or None when there is none."""
        aliases = self._aliases() if self._may_exist() else None
        if not aliases or CHAMPION not in aliases:
            return None
        return self.get(aliases[CHAMPION])

    # --- writing --------------------------------------------------------------------------------------------

    def register(
        self, hf_dir: str | os.PathLike, metrics: dict[str, float], lineage: dict[str, str]
    ) -> ModelVersion:
        """Log the export, metrics and lineage as one MLflow run and make a new version of it (not champion).

        Lineage values are stored as strings (None as ""); metrics that are None are left out."""
        from mlflow.entities import Metric, Param, RunStatus

        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
        client = self._client()
        run = client.create_run(self._experiment_id(), run_name=f"register-{self.name}")
        run_id = run.info.run_id
        try:
            now = _now_ms()
            client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items()) if v is not None],
                params=[Param(k, "" if v is None else str(v)) for k, v in sorted(lineage.items())],
            )
            client.log_artifacts(run_id, str(hf_dir), ARTIFACT)
        except BaseException:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        # The run is complete before any version refers to it: a version never lacks its artifact.
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        self._ensure_registered_model()
        mv = client.create_model_version(self.name, f"{run.info.artifact_uri}/{ARTIFACT}", run_id=run_id)
        log.info("registered %s version %s (run %s)", self.name, mv.version, run_id)
        return self.get(int(mv.version))

    def promote(self, version: int, reason: str = "") -> ModelVersion:
        """Make ``version`` the champion (alias ``champion``), remembering the one it replaces for rollback."""
        target = self.get(version)
        history = self._history()
        if history and history[-1] == target.version:  # already champion: only the reason is updated
            self._tag_promotion(target.version, reason or "promoted again")
            return self.get(target.version)
        self._tag_promotion(target.version, reason)
        self._move_champion([*history, target.version])
        log.info("%s: version %s is champion%s", self.name, target.version, f" ({reason})" if reason else "")
        return self.get(target.version)

    def rollback(self, reason: str = "") -> ModelVersion:
        """Make the previous champion champion again; ValueError if there is none."""
        history = self._history()
        if not history:
            raise ValueError(f"{self.name} has no champion in {self.uri}: nothing to roll back")
        if len(history) < 2:
            raise ValueError(
                f"{self.name} has no previous champion in {self.uri} to roll back to "
                f"(version {history[-1]} is champion)"
            )
        restored = history[-2]
        self._tag_promotion(
            restored, f"rollback from version {history[-1]}" + (f": {reason}" if reason else "")
        )
        self._move_champion(history[:-1])
        log.info("%s: rolled back from version %s to %s", self.name, history[-1], restored)
        return self.get(restored)

    # --- internals ------------------------------------------------------------------------------------------

    def _client(self):
        if self._client_obj is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from a pipeline
            from mlflow.tracking import MlflowClient

            for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # schema set-up, each new db
                logging.getLogger(noisy).setLevel(logging.WARNING)
            if self._default_store:
                self.local_dir.mkdir(parents=True, exist_ok=True)
            self._client_obj = MlflowClient(tracking_uri=self.uri, registry_uri=self.registry_uri)
        return self._client_obj

    def _may_exist(self) -> bool:
        """False when the default database is not there yet: reading never creates it (a mistyped --root)."""
        return not self._default_store or (self.local_dir / "mlflow.db").exists()

    def _experiment_id(self) -> str:
        client = self._client()
        experiment = client.get_experiment_by_name(self.name)
        if experiment is not None:
            return experiment.experiment_id
        artifacts = self._artifact_root()
        return client.create_experiment(
            self.name, artifact_location=artifacts.as_uri() if artifacts else None
        )

    def _artifact_root(self) -> Path | None:
        """Beside the database for SQLite stores (MLflow's own default is ./mlruns of the working directory)."""
        if self._default_store:
            return self.local_dir / "artifacts"
        parsed = urlparse(self.uri)
        if parsed.scheme == "sqlite" and parsed.path not in ("", "/", "/:memory:"):
            return (
                Path(unquote(parsed.path[1:])).resolve().parent / "artifacts"
            )  # sqlite:///rel.db, ////abs.db
        return None  # a server decides where its artifacts go

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        client = self._client()
        try:
            client.get_registered_model(self.name)
        except MlflowException:
            try:
                client.create_registered_model(
                    self.name, description="bertpipe pretrained encoder (HF export)"
                )
            except MlflowException as e:  # created meanwhile by another process
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    def _aliases(self) -> dict[str, int] | None:
        """Alias → version of the registered model, None when it does not exist yet."""
        from mlflow.exceptions import MlflowException

        try:
            model = self._client().get_registered_model(self.name)
        except MlflowException:
            return None
        return {alias: int(v) for alias, v in model.aliases.items()}

    def _history(self) -> list[int]:
        """The champions so far, oldest first, ending at the current one; reconciled with the alias, which wins
        (a kill between writing the history and moving the alias, or an alias moved in the MLflow UI)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self._client().get_registered_model(self.name) if self._may_exist() else None
        except MlflowException:
            model = None
        if model is None or CHAMPION not in model.aliases:
            return []
        champion = int(model.aliases[CHAMPION])
        try:
            history = [int(v) for v in json.loads(model.tags.get(HISTORY_TAG, "[]"))]
        except (ValueError, TypeError):
            history = []
        if champion in history:
            return history[: len(history) - history[::-1].index(champion)]
        return [*history, champion]

    def _move_champion(self, history: list[int]) -> None:
        """History first, then the alias `champion` (the one that counts), then the mirror `previous-champion`."""
        client = self._client()
        history = history[-MAX_HISTORY:]
        client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))
        client.set_registered_model_alias(self.name, CHAMPION, str(history[-1]))
        if len(history) >= 2:
            client.set_registered_model_alias(self.name, PREVIOUS, str(history[-2]))
        elif PREVIOUS in (self._aliases() or {}):
            client.delete_registered_model_alias(self.name, PREVIOUS)

    def _tag_promotion(self, version: int, reason: str) -> None:
        client = self._client()
        client.set_model_version_tag(self.name, str(version), "champion_reason", reason)
        client.set_model_version_tag(self.name, str(version), "promoted_at", _iso(_now_ms()))

    def _version(self, mv, aliases: dict[str, int], download: bool) -> ModelVersion:
        run = self._client().get_run(mv.run_id)
        return ModelVersion(
            version=int(mv.version),
            aliases=sorted(a for a, v in aliases.items() if v == int(mv.version)),
            metrics=dict(run.data.metrics),
            lineage=dict(run.data.params),
            hf_dir=self._hf_dir(run, download),
            created_at=_iso(mv.creation_timestamp),
            tags=dict(mv.tags),
            run_id=mv.run_id,
        )

    def _hf_dir(self, run, download: bool) -> Path:
        """The export in place for a local artifact store; else fetched once into ROOT/registry/downloads."""
        uri = run.info.artifact_uri
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            return Path(unquote(parsed.path)) / ARTIFACT
        target = self.local_dir / "downloads" / run.info.run_id
        if download and not (target / ARTIFACT).is_dir():
            from mlflow.artifacts import download_artifacts

            target.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{run.info.run_id}-", dir=target.parent))
            try:  # fetched beside, renamed into place: a killed download is never taken for a complete one
                download_artifacts(
                    run_id=run.info.run_id,
                    artifact_path=ARTIFACT,
                    dst_path=str(partial),
                    tracking_uri=self.uri,
                )
                partial.rename(target)
            except OSError:
                if not (target / ARTIFACT).is_dir():
                    raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return target / ARTIFACT


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _span(versions: list[int | str]) -> str:
    return ", ".join(str(v) for v in versions) if versions else "none"


def _now_ms() -> int:
    return int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000)


def _iso(ms: int | None) -> str:
    if ms is None:
        return ""
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).isoformat(timespec="seconds")
