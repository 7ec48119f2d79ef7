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

Damage. A SQLite registry that exists but cannot be read (empty, truncated, not SQLite, without MLflow's tables)
is refused before MLflow opens it (MLflow would write a fresh schema into it and the history would be gone):
:class:`RegistryDamaged`, one line naming the file. Each version's run directory keeps what the registry holds
(weights, figures, lineage; each promotion is noted in its run record too), so :meth:`Registry.rebuild` moves a
damaged database aside and registers the runs again, champion and promotion history included.

Only ``flows/`` imports mlflow, and only inside these methods: importing this module costs nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
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
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
MLFLOW_TABLES = ("experiments", "runs", "registered_models", "model_versions", "alembic_version")


class RegistryDamaged(ValueError):
    """The registry's database exists but cannot be read; it is left untouched."""


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
        self._note_promotion(target, "promoted", reason)
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
        why = f"rollback from version {history[-1]}" + (f": {reason}" if reason else "")
        self._tag_promotion(restored, why)
        self._move_champion(history[:-1])
        model = self.get(restored)
        self._note_promotion(model, "rollback", why)
        log.info("%s: rolled back from version %s to %s", self.name, history[-1], restored)
        return model

    def rebuild(self, force: bool = False, say: Callable[[str], None] = log.info) -> list[int]:
        """Register every run under ROOT/runs that has a record and complete weights again, in run order, into a
        fresh registry, and restore the champion and its history from the runs' promotion logs; returns the
        history. A damaged database (or, with ``force``, a readable one) is moved aside, never deleted; ``say``
        gets one line per version and a summary."""
        from data_prep.manifest import acquire_writer_lock, release_writer_lock
        from flows.retrain_plan import restore_plan

        plan = restore_plan(self.root)
        if not plan.runs:
            raise ValueError(
                f"{self.root / 'runs'} holds no run with a record and complete weights: "
                "nothing to rebuild the registry from"
            )
        acquire_writer_lock(self.root)  # no retraining run writes the registry meanwhile
        try:
            aside = self._set_aside(force, say)
            for run_dir, why in plan.skipped:
                say(f"{run_dir}: skipped ({why})")
            numbers: list[int] = []
            renumbered: dict[int, int] = {}  # a version's number in the old registry → in the new one
            for run in plan.runs:
                lineage = dict(run.lineage)
                parent = lineage.get("parent_version", "")
                if parent.isdigit() and int(parent) in renumbered:
                    lineage["parent_version"] = str(renumbered[int(parent)])
                version = self.register(run.hf_dir, run.metrics, lineage).version
                self._client().set_model_version_tag(
                    self.name, str(version), "restored_from", str(run.run_dir)
                )
                if run.promotions:  # the tags its last promotion left
                    last = run.promotions[-1]
                    self._client().set_model_version_tag(self.name, str(version), "champion_reason",
                                                         last.get("reason", ""))  # fmt: skip
                    self._client().set_model_version_tag(self.name, str(version), "promoted_at", last["at"])
                if run.version is not None:
                    renumbered[int(run.version)] = version
                numbers.append(version)
                was = f" (was version {run.version})" if run.version not in (None, version) else ""
                figures = ", ".join(f"{k} {v:.4g}" for k, v in sorted(run.metrics.items()))
                say(f"version {version} ← {run.run_dir}{was}" + (f": {figures}" if figures else ""))
            history = [numbers[i] for i in plan.history]
            if history:
                self._move_champion(history)
        finally:
            release_writer_lock(self.root)
        champion = (
            f"champion: version {history[-1]} (history {', '.join(map(str, history))})"
            if history
            else f"no champion: no run's record says it was promoted (`bertpipe models promote VERSION --root {self.root}`)"
        )
        notes = [f"{len(plan.skipped)} run directories skipped"] if plan.skipped else []
        if plan.inferred:
            notes.append("older runs' promotions taken from their gate decisions")
        if aside is not None:
            notes.append(f"the old database is kept at {aside}")
        say(f"rebuilt {self.uri}: {len(numbers)} versions from {self.root / 'runs'}, {champion}"
            + "".join(f"; {n}" for n in notes))  # fmt: skip
        return history

    # --- internals ------------------------------------------------------------------------------------------

    def _client(self):
        if self._client_obj is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from a pipeline
            from mlflow.tracking import MlflowClient

            for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # schema set-up, each new db
                logging.getLogger(noisy).setLevel(logging.WARNING)
            self.check()  # before MLflow opens it: MLflow would write a fresh schema into a damaged file
            if self._default_store:
                self.local_dir.mkdir(parents=True, exist_ok=True)
            self._client_obj = MlflowClient(tracking_uri=self.uri, registry_uri=self.registry_uri)
        return self._client_obj

    def check(self) -> None:
        """RegistryDamaged (one line: the file, what is wrong, how to recover) when a SQLite store exists but
        cannot be read; reads the file only, never writes it."""
        for path in dict.fromkeys(p for p in (_sqlite_file(self.uri), _sqlite_file(self.registry_uri)) if p):
            why = _sqlite_damage(path)
            if why is not None:
                raise RegistryDamaged(
                    f"the registry {path} cannot be read ({why}); it is left as it is: "
                    f"`bertpipe models rebuild --root {self.root}` moves it aside and registers the versions "
                    f"again from {self.root / 'runs'}"
                )

    def _set_aside(self, force: bool, say: Callable[[str], None]) -> Path | None:
        """Move the SQLite database aside (renamed, never deleted) before a rebuild: always when it cannot be read,
        with ``force`` when it can; a registry that holds versions is otherwise refused."""
        path = _sqlite_file(self.uri)
        if path is None:  # a server: only filled again when it holds nothing of this model
            held = len(self.versions(download=False))
            if held:
                raise ValueError(
                    f"{self.uri} holds {held} versions of {self.name}: rebuild fills an empty registry"
                )
            return None
        if not path.exists():
            return None
        why = _sqlite_damage(path)
        held = _sqlite_versions(path, self.name) if why is None else 0
        if held and not force:
            raise ValueError(
                f"the registry {path} is readable and holds {held} versions of {self.name}: nothing to rebuild "
                f"(`--force` moves it aside and rebuilds it from {self.root / 'runs'} all the same)"
            )
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{path.name}.{'damaged' if why else 'replaced'}-{stamp}")
        for suffix in ("-journal", "-wal", "-shm", ""):  # the database last: its side files belong to it
            side = Path(f"{path}{suffix}")
            if side.exists():
                side.rename(Path(f"{aside}{suffix}"))
        _forget_mlflow_store(self.uri)
        self._client_obj = None
        say(f"{path} moved aside to {aside.name}" + (f" ({why})" if why else ""))
        return aside

    def _note_promotion(self, model: ModelVersion, event: str, reason: str) -> None:
        """Note in the version's run record that it became champion: what ``rebuild`` replays."""
        run_dir = model.lineage.get("run_dir")
        if not run_dir:
            return
        from flows.retrain_plan import record_promotion

        try:
            record_promotion(run_dir, event, model.version, reason)
        except OSError as e:  # the registry has moved already; only a later rebuild would miss this promotion
            log.warning("could not note the promotion of version %s in %s: %s", model.version, run_dir, e)

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
        database = _sqlite_file(self.uri)
        return database.parent / "artifacts" if database else None  # a server decides where its artifacts go

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


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (``sqlite:///rel.db``, ``sqlite:////abs.db``), else None."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return None
    return Path(unquote(parsed.path[1:])).resolve()


def _sqlite_damage(path: Path) -> str | None:
    """What is wrong with the SQLite registry ``path`` (None: nothing, or it does not exist), read-only."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return "it is empty: 0 bytes"
    with open(path, "rb") as f:
        header = f.read(100)  # the database header: https://www.sqlite.org/fileformat.html
    if header[: len(SQLITE_HEADER)] != SQLITE_HEADER:
        return "it is not a SQLite database"
    if len(header) < 100:
        return f"it is truncated: {size} bytes, less than a SQLite header"
    if any(Path(f"{path}{side}").exists() for side in ("-journal", "-wal")):
        return None  # a write was cut short: SQLite mends it from the journal when it next opens the file
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return "its SQLite header is damaged"
    counted = int.from_bytes(header[28:32], "big")  # pages; valid while offset 92 equals the change counter
    if size % page_size or (header[92:96] == header[24:28] and counted * page_size > size):
        return f"it is truncated: {size} bytes, where its header counts {counted} pages of {page_size} bytes"
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            tables = {
                row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            check = connection.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error as e:
        return f"SQLite cannot read it: {e}"
    missing = [t for t in MLFLOW_TABLES if t not in tables]
    if missing:
        return f"it lacks MLflow's tables {', '.join(missing)}"
    if check != "ok":
        return f"SQLite finds it damaged: {check}"
    return None


def _sqlite_versions(path: Path, name: str) -> int:
    """How many versions of ``name`` a readable SQLite registry holds, read without MLflow (which would keep the
    file open for the life of the process)."""
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT COUNT(*) FROM model_versions WHERE name = ?", (name,)).fetchone()[0]
    finally:
        connection.close()


def _forget_mlflow_store(uri: str) -> None:
    """Drop MLflow's per-process store and engine for ``uri``: after the database is moved aside they would still
    write into the moved file. MLflow internals, touched defensively."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    for store_registry in (tracking_utils._tracking_store_registry, registry_utils._get_store_registry()):
        cached = getattr(type(store_registry), "_get_store_with_resolved_uri", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    for store in (TrackingStore, RegistryStore):
        engine = getattr(store, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()


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
