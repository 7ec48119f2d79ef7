"""What a retraining run does, as plain functions: no Prefect, no MLflow; ``flows/retrain.py`` calls them.

The settings (``retrain`` and ``gate`` sections of a preset), the content hashes that say which corpus files are
new, the batches new files are sharded in, the mix of new and old examples, the continued-pretraining config,
the gate's decision and the record a run leaves for the next one. The CLI and tests reach all of it without
starting Prefect; the flow's tasks are a few lines each around these calls.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.manifest import (
    StageError,
    begin_stage,
    complete_manifest,
    file_entry,
    fingerprint,
    read_json,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from flows.config import PipelineConfig, PipelineConfigError, load_pipeline_config

RUN_RECORD = "retrain.json"  # ROOT/runs/<n>/retrain.json: what the model of that run was trained on
PROMOTIONS = "promotions"  # the record's log of each time its version became champion (promote, rollback)


# --- settings --------------------------------------------------------------------------------------------


@dataclass
class RetrainSettings:
    """How a retraining run continues from the champion (the ``retrain`` section of a preset)."""

    max_steps: int | None = 20
    """Optimizer steps of continued pretraining (from the champion's weights, counted from 0)."""
    time_budget: str | None = None
    """Wall time of continued pretraining instead of, or as a cap beside, ``max_steps`` (e.g. "30m")."""
    lr: float | None = None
    """Peak learning rate of continued pretraining; None: the ``pretrain`` section's."""
    warmup_steps: int = 2
    """A short warmup: the optimizer state is new, the weights are not."""
    new_fraction: float = 0.5
    """Share of the training rows taken from new data; the rest is a seeded sample of old example parts."""
    heldout_examples: int = 512
    """Held-out examples (the first run's valid split, from its start) both models are scored on."""
    unk_drift_warning: float = 0.005
    """Warn when the new text's UNK rate exceeds the champion's by more than this (0.005: half a point)."""
    seed: int = 0
    """Seeds the sample of old parts and each batch's examples."""

    def __post_init__(self) -> None:
        if self.max_steps is None and self.time_budget is None:
            raise ValueError(
                "give retrain.max_steps or retrain.time_budget: how long to continue pretraining"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"retrain.max_steps must be at least 1, got {self.max_steps}")
        if not 0.0 < self.new_fraction <= 1.0:
            raise ValueError(f"retrain.new_fraction must be in (0, 1], got {self.new_fraction}")
        if self.heldout_examples < 1:
            raise ValueError(f"retrain.heldout_examples must be at least 1, got {self.heldout_examples}")
        if self.warmup_steps < 0 or self.unk_drift_warning < 0:
            raise ValueError("retrain.warmup_steps and retrain.unk_drift_warning must be >= 0")


@dataclass
class GateRule:
    """When a challenger replaces the champion (the ``gate`` section): every check must hold."""

    mlm_loss_tolerance: float = 0.0
    """Held-out MLM loss may exceed the champion's by this share of it (0.05: 5% worse at most)."""
    finetune: dict[str, str] = field(default_factory=dict)
    """Task → metric whose median over seeds may not drop, e.g. {"cola": "mcc"}."""
    finetune_tolerance: float = 0.0
    """How far (absolute) a fine-tuning median may fall below the champion's and still pass."""
    min_lift: float | None = None
    """Each ``finetune`` task's median must beat the same fine-tuning from random initialisation by at least
    this (absolute, e.g. 0.02): a model whose pretraining learned nothing is never promoted, the first one
    included. None: not checked (and no random-init baseline is fine-tuned)."""

    def __post_init__(self) -> None:
        if not isinstance(self.finetune, dict) or not all(isinstance(v, str) for v in self.finetune.values()):
            raise ValueError('gate.finetune maps a task to its metric, e.g. {"cola": "mcc"}')
        if self.min_lift is not None:
            if isinstance(self.min_lift, bool) or not isinstance(self.min_lift, int | float):
                raise ValueError(f"gate.min_lift must be a number (e.g. 0.02) or null, got {self.min_lift!r}")
            if not self.finetune:
                raise ValueError(
                    'gate.min_lift needs gate.finetune to name the tasks it applies to, e.g. {"sst2": "accuracy"}'
                )
        if self.mlm_loss_tolerance <= -1:
            raise ValueError(f"gate.mlm_loss_tolerance must be above -1, got {self.mlm_loss_tolerance}")


@dataclass
class RetrainConfig:
    """A retraining preset: the pipeline sections (first run, data stages, fine-tuning) plus retrain and gate."""

    pipeline: PipelineConfig
    retrain: RetrainSettings
    gate: GateRule


def load_retrain_config(preset: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RetrainConfig:
    """A preset with ``section.key=value`` overrides (``retrain.*`` and ``gate.*`` too), checked before work."""
    pipeline = load_pipeline_config(preset, list(overrides))
    built = []
    for name, cls in (("retrain", RetrainSettings), ("gate", GateRule)):
        values = getattr(pipeline, name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PipelineConfigError(f'section "{name}": unknown keys {unknown}; known: {sorted(known)}')
        try:
            built.append(cls(**values))
        except (TypeError, ValueError) as e:
            raise PipelineConfigError(f'section "{name}": {e}') from None
    if not pipeline.pretrain:
        raise PipelineConfigError(
            'a retrain preset needs a "pretrain" section (the first run trains with it)'
        )
    return RetrainConfig(pipeline, *built)


# --- what is new: file hashes, batches --------------------------------------------------------------------


def content_hashes(inputs: list[str]) -> dict[str, str]:
    """sha256 of every input file (a saved dataset: of all its files), by path."""
    from data_prep.textio import discover_inputs

    units, _ = discover_inputs(inputs)
    hashes = {}
    for unit in units:
        if unit.kind == "hf_hub":
            raise StageError(
                f"retraining hashes its inputs: {unit.location} is not local; save it to disk first"
            )
        path = Path(unit.location)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            hashes[str(path)] = fingerprint([[str(p.relative_to(path)), sha256_file(p)] for p in files])
        else:
            hashes[str(path)] = sha256_file(path)
    if not hashes:
        raise StageError(f"no input files found in {', '.join(inputs)}")
    return hashes


def new_files(current: dict[str, str], seen: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(files whose content the champion has not seen, those of them at a path it saw with other content)."""
    known = set(seen.values())
    new = {path: digest for path, digest in current.items() if digest not in known}
    changed = sorted(path for path in new if path in seen)
    return new, changed


def batch_id(files: dict[str, str], shard_settings: dict) -> str:
    """A batch's name: its files' contents and the shard settings (not paths: a moved file is the same)."""
    return fingerprint({"contents": sorted(files.values()), "shard": shard_settings})[:16]


def known_batches(root: Path) -> list[dict]:
    """The batches earlier runs under ``root`` made (``ROOT/data/batches/<id>.json``)."""
    directory = Path(root) / "data" / "batches"
    return [b for p in sorted(directory.glob("*.json")) if (b := read_json(p))] if directory.is_dir() else []


def assign_batches(new: dict[str, str], known: list[dict], shard_settings: dict) -> list[dict]:
    """The batches that cover ``new``: earlier ones whose every file is among them (a rejected run's, an
    interrupted run's), then one batch of what is left."""
    todo, batches = dict(new), []
    digests = set(new.values())
    for batch in sorted(known, key=lambda b: b["id"]):
        contents = set(batch["files"].values())
        if batch.get("shard") == shard_settings and contents and contents <= digests & set(todo.values()):
            batches.append(batch)
            todo = {p: d for p, d in todo.items() if d not in contents}
    if todo:
        batches.append({"id": batch_id(todo, shard_settings), "files": todo, "shard": shard_settings})
    return batches


def batch_seed(seed: int, batch: str) -> int:
    """The examples seed of a batch: the examples section's seed moved by the batch id, so no two batches
    share their masks and negatives."""
    return (seed + int(batch[:8], 16)) % (1 << 31)


def new_text_stats(vocab_dir: str | Path, shard_dirs: list[str]) -> dict:
    """UNK rate, tokens and documents of the shards under the frozen vocabulary (``data_prep.vocab``)."""
    from data_prep.vocab import load_vocab, vocab_stats

    parts, documents = [], 0
    for directory in shard_dirs:
        manifest = read_manifest(directory)
        documents += manifest["stats"]["documents"]
        parts += [Path(directory) / e["path"] for e in manifest["files"]
                  if e["path"].endswith(".parquet") and e.get("rows")]  # fmt: skip
    return {**vocab_stats(load_vocab(vocab_dir), parts), "documents": documents}


def unk_drift(record: dict | None, new_text: dict, warning: float) -> tuple[dict, str | None]:
    """(the new data's figures beside the champion's UNK rate, a warning when the rate rose past ``warning``)."""
    champion_unk = record["unk_tokens"] / max(1, record["tokens"]) if record else None
    drift = None if champion_unk is None else new_text["unk_rate"] - champion_unk
    figures = {"documents": new_text["documents"], "tokens": new_text["tokens"],
               "unk_rate": new_text["unk_rate"], "champion_unk_rate": champion_unk, "unk_drift": drift}  # fmt: skip
    if drift is None or drift <= warning:
        return figures, None
    return figures, (f"UNK rate of the new text {new_text['unk_rate']:.2%} is {drift:.2%} above the champion's "
                     f"{champion_unk:.2%} (warning past {warning:.2%}): the frozen vocabulary covers it less "
                     "well; consider a new root with a new vocabulary")  # fmt: skip


# --- the examples mix: new parts and a sample of old ones, hard-linked under one manifest -------------------


def example_parts(examples_dir: Path, split: str) -> list[tuple[Path, dict]]:
    """(examples directory, manifest entry) of each non-empty Arrow part of ``split``."""
    manifest = read_manifest(examples_dir) or {"files": []}
    return [(examples_dir, e) for e in manifest["files"]
            if e["path"].startswith(f"{split}/") and e["path"].endswith(".arrow") and e.get("rows")]  # fmt: skip


def sample_old_parts(old: list[tuple[str, int]], target_rows: int, seed: int) -> list[tuple[str, int]]:
    """A seeded sample of (part, rows) adding up to at least ``target_rows`` (all of them if they hold fewer)."""
    order = np.random.default_rng([seed, len(old)]).permutation(len(old))
    chosen, rows = [], 0
    for i in order:
        if rows >= target_rows:
            break
        chosen.append(old[i])
        rows += old[i][1]
    return sorted(chosen)


def plan_mix(
    new_parts: list[tuple[Path, dict]], old_parts: list[tuple[Path, dict]], new_fraction: float, seed: int
) -> tuple[list[tuple[Path, dict]], dict]:
    """(the training parts: every new one and a seeded sample of old ones so that ``new_fraction`` of the rows
    are new, the figures of the mix)."""
    new_rows = sum(e["rows"] for _, e in new_parts)
    target = round(new_rows * (1 - new_fraction) / new_fraction)
    by_key = {f"{d}/{e['path']}": (d, e) for d, e in old_parts}
    sampled = sample_old_parts([(k, e["rows"]) for k, (_, e) in by_key.items()], target, seed)
    figures = {"new_rows": new_rows, "old_rows": sum(r for _, r in sampled), "old_parts": len(sampled),
               "old_parts_available": len(old_parts)}  # fmt: skip
    return new_parts + [by_key[k] for k, _ in sampled], figures


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem: a copy (the sources are never rewritten either way)
        shutil.copy2(source, target)


def build_mix(
    out: Path, train: list[tuple[Path, dict]], valid: list[tuple[Path, dict]], vocab_dir: Path
) -> dict:
    """An examples directory at ``out`` of hard-linked parts: ``train``/``valid`` are (examples dir, manifest
    entry) pairs; its fingerprint is that of the parts it lists."""
    files = []
    sources = {"train": sorted((str(d), e["path"], e["sha256"]) for d, e in train),
               "valid": sorted((str(d), e["path"], e["sha256"]) for d, e in valid)}  # fmt: skip
    stage = begin_stage(out, "examples", {"mix": sources}, {}, 1)
    if stage.complete:
        return read_manifest(out)
    for split, parts in (("train", train), ("valid", valid)):
        for i, (directory, entry) in enumerate(sorted(parts, key=lambda p: (str(p[0]), p[1]["path"]))):
            relpath = f"{split}/{i:05d}-{Path(entry['path']).name}"
            _link(Path(directory) / entry["path"], out / relpath)
            files.append({**entry, "path": relpath})
    for name in sorted(p.name for p in vocab_dir.iterdir() if p.is_file()):
        _link(vocab_dir / name, out / "vocab" / name)
        files.append(file_entry(out, f"vocab/{name}"))
    rows = {s: sum(e["rows"] or 0 for _, e in parts) for s, parts in (("train", train), ("valid", valid))}
    return stage.commit(files, {"examples": rows["train"] + rows["valid"], "examples_by_split": rows},
                        extra={"vocab_dir": "vocab"})  # fmt: skip


# --- training and evaluation ------------------------------------------------------------------------------


def continued_pretraining(train_config: Any, settings: RetrainSettings, champion_hf_dir: Path) -> Any:
    """``train_config`` (a TrainConfig) continued from the champion's weights: fresh optimizer, short warmup,
    the ``retrain`` section's length and learning rate."""
    return dataclasses.replace(
        train_config, init_from=str(champion_hf_dir), max_steps=settings.max_steps,
        time_budget=settings.time_budget, warmup_steps=settings.warmup_steps,
        lr=settings.lr or train_config.lr, schedule_steps=None,
        decay=train_config.decay if settings.max_steps is not None else "constant",
    )  # fmt: skip


def eval_dir(evals_root: Path, model_dir: Path) -> Path:
    """Where a model's evaluations are kept: by its weights, so a champion is evaluated once."""
    return evals_root / sha256_file(Path(model_dir) / "model.safetensors")[:16]


def heldout_figures(model_dir: str, out: str, heldout: str, num_examples: int) -> dict[str, float]:
    """Held-out MLM loss and accuracy of one model (``bert.pretrain.heldout``), cached in ``out`` by held-out set."""
    from bert.pretrain.heldout import evaluate_mlm

    heldout_fp = (read_manifest(heldout) or {}).get("fingerprint", "")[:16]
    cache = Path(out) / f"heldout-{heldout_fp}-{num_examples}.json"
    figures = read_json(cache)
    if figures is None:
        figures = evaluate_mlm(model_dir, heldout, "valid", max_examples=num_examples)
        write_json_atomic(cache, figures)
    return {f"heldout_{k}": float(figures[k]) for k in ("mlm_loss", "mlm_acc", "nsp_acc")}


def gate_decision(rule: GateRule, champion: dict[str, float] | None, challenger: dict[str, float]) -> dict:
    """``{"promote", "checks", "reason"}``: each check with both figures, its threshold and whether it held.

    ``champion`` None: there is none yet, and the first model is promoted if it keeps ``min_lift``.
    """
    if champion is None:
        checks = lift_checks(rule, challenger)
        failed = [c for c in checks if not c["passed"]]
        if failed:
            return {"promote": False, "checks": checks, "reason": f"not promoted: {_failures(failed)}"}
        return {"promote": True, "checks": checks, "reason": "first model: nothing to compare against"
                + (", and it keeps its lift over random initialisation" if checks else "")}  # fmt: skip
    checks = []
    loss_old, loss_new = champion.get("heldout_mlm_loss"), challenger.get("heldout_mlm_loss")
    limit = None if loss_old is None else loss_old * (1 + rule.mlm_loss_tolerance)
    checks.append({"metric": "heldout_mlm_loss", "champion": loss_old, "challenger": loss_new,
                   "rule": f"≤ champion × {1 + rule.mlm_loss_tolerance:g}", "threshold": limit,
                   "passed": loss_new is not None and (limit is None or loss_new <= limit)})  # fmt: skip
    for task_name, metric in sorted(rule.finetune.items()):
        key = f"{task_name}_{metric}"
        old, new = champion.get(key), challenger.get(key)
        threshold = None if old is None else old - rule.finetune_tolerance
        # A median missing on both sides (every seed degenerate) says nothing either way: not a regression.
        passed = (new is not None and (threshold is None or new >= threshold)) or (
            old is None and new is None
        )
        checks.append({"metric": key, "champion": old, "challenger": new, "threshold": threshold,
                       "rule": f"≥ champion − {rule.finetune_tolerance:g}", "passed": passed})  # fmt: skip
    checks += lift_checks(rule, challenger)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        return {"promote": False, "checks": checks, "reason": f"kept the champion: {_failures(failed)}"}
    return {"promote": True, "checks": checks, "reason": "every gate check held"}


def lift_key(task_name: str, metric: str) -> str:
    """The evaluation key of a task's lift over random initialisation: its median minus the baseline's."""
    return f"{task_name}_{metric}_lift"


def lift_checks(rule: GateRule, challenger: dict[str, float]) -> list[dict]:
    """One check per gate task when ``min_lift`` is set: the challenger's lift over random initialisation.

    A lift that could not be measured (every seed of either side degenerate) fails: nothing shows that the
    pretraining taught the model anything."""
    if rule.min_lift is None:
        return []
    checks = []
    for task_name, metric in sorted(rule.finetune.items()):
        key = lift_key(task_name, metric)
        value = challenger.get(key)
        checks.append({"metric": key, "champion": None, "challenger": value, "threshold": rule.min_lift,
                       "rule": f"≥ {rule.min_lift:g} over random init",
                       "passed": value is not None and value >= rule.min_lift})  # fmt: skip
    return checks


def _failures(failed: list[dict]) -> str:
    return "; ".join(
        f"{c['metric']} {_fmt(c['challenger'])}"
        + ("" if c["metric"].endswith("_lift") else f" vs champion {_fmt(c['champion'])}")
        + f" (needs {c['rule']})"
        for c in failed
    )


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


# --- the run directory and its record ------------------------------------------------------------------------


def next_run_dir(root: Path) -> Path:
    """A new ``ROOT/runs/<n>``, one past the highest there."""
    runs = Path(root) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in runs.iterdir() if p.name.isdigit()]
    run_dir = runs / str(max(numbers, default=0) + 1)
    run_dir.mkdir()
    return run_dir


def run_record(
    record: dict | None, new: dict[str, str], batches: list[str], vocab_dir: str, heldout: Path,
    new_text: dict, parent_version: int | None, decision: dict,
) -> dict:  # fmt: skip
    """What this run's model was trained on, for the next run: the champion's ``record`` plus what was new."""
    return {
        "corpus_files": {**(record["corpus_files"] if record else {}), **new},
        "batches": batches, "vocab_dir": str(vocab_dir), "heldout": str(heldout),
        "unk_tokens": (record["unk_tokens"] if record else 0) + new_text["unk_tokens"],  # the corpus so far
        "tokens": (record["tokens"] if record else 0) + new_text["tokens"],
        "parent_version": parent_version, "decision": decision,
    }  # fmt: skip


def evaluated_record(record: dict, metrics: dict[str, float], lineage: dict[str, str]) -> dict:
    """The run record as written before registering: ``record`` (``run_record``) with the challenger's figures
    and lineage (what ``bertpipe models rebuild`` registers the run with again) and an empty promotion log."""
    return {**record, "metrics": dict(metrics), "lineage": dict(lineage), PROMOTIONS: []}


def lineage(
    record: dict, mix: str | Path, run_dir: Path, parent_version: int | None, flow_run_id: str
) -> dict:
    """The registry's lineage of this run's model: the fingerprints of what it was made from."""
    from data_prep.vocab import load_vocab

    return {
        "corpus": fingerprint(sorted(record["corpus_files"].values())), "batches": ",".join(record["batches"]),
        "vocab": load_vocab(record["vocab_dir"]).fingerprint,
        "examples": (read_manifest(mix) or {}).get("fingerprint", ""),
        "pretrain": (read_manifest(run_dir / "pretrain") or {}).get("fingerprint", ""),
        "heldout": record["heldout"], "parent_version": "" if parent_version is None else str(parent_version),
        "run_dir": str(run_dir), "flow_run_id": flow_run_id,
    }  # fmt: skip


# --- what the run directories tell: earlier runs, promotions, a registry rebuilt from them ---------------------


def earlier_runs(root: str | os.PathLike) -> list[Path]:
    """``ROOT/runs/<n>`` directories that hold a run record (runs that reached evaluation), in run order."""
    runs = Path(root) / "runs"
    if not runs.is_dir():
        return []
    found = [p for p in runs.iterdir() if p.name.isdigit() and (p / RUN_RECORD).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def refuse_fresh_start(root: Path, registry_uri: str, num_versions: int) -> None:
    """StageError when there is no champion although ``root`` holds earlier runs: training from scratch would
    start a second lineage beside the first and a new "version 1" over the old history."""
    runs = earlier_runs(root)
    if not runs:
        return
    if num_versions == 0:
        raise StageError(
            f"{root} holds {_runs(len(runs))} but no registry ({registry_uri} holds no versions): "
            f"run `bertpipe models rebuild --root {root}` rather than train from scratch"
        )
    raise StageError(
        f"{root} holds {_runs(len(runs))} but the registry {registry_uri} has no champion among its "
        f"{num_versions} versions: make one champion (`bertpipe models promote VERSION --root {root}`)"
    )


def _runs(count: int) -> str:
    return f"{count} earlier run" + ("" if count == 1 else "s")


def _has_weights(directory: Path) -> bool:
    from bert.model.hf import WEIGHT_FILES

    return (directory / "config.json").is_file() and any((directory / w).is_file() for w in WEIGHT_FILES)


def check_champion_artifact(root: Path, version: int, hf_dir: Path, run_dir: str | None) -> None:
    """StageError (one line, saying where the weights still are) when the champion's export is gone from the
    registry's artifact store: continued pretraining would start from nothing."""
    if _has_weights(Path(hf_dir)):
        return
    kept = Path(run_dir) / "pretrain" / "hf" if run_dir else None
    if kept is not None and _has_weights(kept):
        raise StageError(
            f"the champion's artifact (version {version}) is missing at {hf_dir}; its weights are still in "
            f"{kept}: copy them back (`mkdir -p {hf_dir} && cp -r {kept}/. {hf_dir}`) or register the runs "
            f"again (`bertpipe models rebuild --root {root} --force`)"
        )
    gone = f", and {kept} no longer holds them either" if kept is not None else ""
    raise StageError(
        f"the champion's artifact (version {version}) is missing at {hf_dir}{gone}: make another version "
        f"champion (`bertpipe models promote VERSION --root {root}`)"
    )


def record_promotion(run_dir: str | os.PathLike, event: str, version: int, reason: str) -> bool:
    """Add to the run record's promotion log that its version became champion (``event``: "promoted" or
    "rollback"); False when ``run_dir`` holds no record. What ``bertpipe models rebuild`` replays."""
    path = Path(run_dir) / RUN_RECORD
    record = read_json(path)
    if record is None:
        return False
    at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
    entry = {"event": event, "version": version, "reason": reason, "at": at}
    write_json_atomic(path, {**record, PROMOTIONS: [*promotions(record, Path(run_dir)), entry]})
    return True


def promotions(record: dict, run_dir: Path) -> list[dict]:
    """The record's promotion log. A record from before the log was kept: its gate's promotion, if the gate held,
    dated by its pretraining's manifest (promotions by hand were not recorded then)."""
    if PROMOTIONS in record:
        return list(record[PROMOTIONS])
    decision = record.get("decision") or {}
    if not decision.get("promote"):
        return []
    dated = run_dir / "pretrain" / "manifest.json"
    when = (dated if dated.exists() else run_dir / RUN_RECORD).stat().st_mtime
    at = _dt.datetime.fromtimestamp(when, _dt.timezone.utc).isoformat(timespec="microseconds")
    return [{"event": "promoted", "version": record.get("version"), "reason": decision.get("reason", ""),
             "at": at, "inferred": True}]  # fmt: skip


@dataclass
class RestoredRun:
    """One run directory as ``bertpipe models rebuild`` registers it again."""

    run_dir: Path
    hf_dir: Path  # its complete pretraining export
    metrics: dict[str, float]  # the challenger's figures when it was evaluated
    lineage: dict[str, str]
    version: int | None  # the version it had, when its record says
    promotions: list[dict]  # its promotion log (``promotions``)


@dataclass
class RestorePlan:
    """What the run directories under a root tell about the registry they fed."""

    runs: list[RestoredRun]  # to register, in run order
    skipped: list[tuple[Path, str]]  # run directories left out, and why
    history: list[int]  # the champions, oldest first, as indexes into ``runs``; the last one is champion
    inferred: bool  # some promotion was inferred from a gate decision (a record without a promotion log)


def restore_plan(root: str | os.PathLike) -> RestorePlan:
    """Every run under ``root/runs`` that has a record and a complete pretraining export, with its figures and
    lineage, and the champion history replayed from the runs' promotion logs in time order."""
    runs_dir = Path(root) / "runs"
    numbered = [p for p in runs_dir.iterdir() if p.name.isdigit()] if runs_dir.is_dir() else []
    runs, skipped = [], []
    for run_dir in sorted(numbered, key=lambda p: int(p.name)):
        record = read_json(run_dir / RUN_RECORD)
        if record is None:
            skipped.append(
                (run_dir, f"no {RUN_RECORD}: the run ended before evaluation, it was never registered")
            )
            continue
        manifest = complete_manifest(run_dir / "pretrain", "pretrain")
        hf_dir = run_dir / "pretrain" / (manifest or {}).get("hf_dir", "hf")
        if manifest is None or not _has_weights(hf_dir):
            was = f", was version {record['version']}" if record.get("version") is not None else ""
            skipped.append((run_dir, f"its pretraining export is incomplete or gone{was}"))
            continue
        summary = record.get("summary") or {}
        metrics = record.get("metrics") or summary.get("challenger_metrics") or {}
        runs.append(RestoredRun(run_dir=run_dir, hf_dir=hf_dir, metrics=dict(metrics),
                                lineage=_recorded_lineage(record, run_dir), version=record.get("version"),
                                promotions=promotions(record, run_dir)))  # fmt: skip
    events = sorted(((_dt.datetime.fromisoformat(e["at"]), i, e) for i, run in enumerate(runs)
                     for e in run.promotions), key=lambda t: (t[0], t[1]))  # fmt: skip
    history: list[int] = []
    for _, i, entry in events:  # what Registry.promote and Registry.rollback did to the history, again
        if entry.get("event") == "rollback" and len(history) >= 2 and history[-2] == i:
            history.pop()
        elif not history or history[-1] != i:
            history.append(i)
    inferred = any(e.get("inferred") for _, _, e in events)
    return RestorePlan(runs=runs, skipped=skipped, history=history, inferred=inferred)


def _recorded_lineage(record: dict, run_dir: Path) -> dict[str, str]:
    """The lineage the run was registered with: kept in its record; for an older record, computed again from
    it, or what the record itself says when the vocabulary or examples it names are gone."""
    if "lineage" in record:
        return {k: "" if v is None else str(v) for k, v in record["lineage"].items()}
    parent = record.get("parent_version")
    flow_run_id = str((record.get("summary") or {}).get("flow_run_id", ""))
    try:
        return lineage(record, run_dir / "mix", run_dir, parent, flow_run_id)
    except (OSError, ValueError, KeyError, TypeError):
        return {"corpus": fingerprint(sorted((record.get("corpus_files") or {}).values())),
                "batches": ",".join(record.get("batches") or []), "heldout": str(record.get("heldout", "")),
                "parent_version": "" if parent is None else str(parent), "run_dir": str(run_dir),
                "flow_run_id": flow_run_id}  # fmt: skip
