"""The Prefect flow ``bert-retrain``: new corpus files in, continued pretraining, an evaluation gate, the registry.

One run, under ``ROOT`` (``out``)::

    ROOT/registry/                  the model registry (flows/registry.py); alias ``champion``
    ROOT/data/batches/<id>.json     a batch of input files that were new together: path → sha256
    ROOT/data/shards-<id>/          that batch's corpus shards (the shard stage)
    ROOT/data/vocab-<fp>/           the vocabulary of the first run, frozen for every run after it
    ROOT/data/examples-<fp>/        a batch's examples (named by their fingerprint: never rebuilt in place)
    ROOT/runs/<n>/                  this run only: mix/ (the training examples), pretrain/, retrain.json
    ROOT/evals/<model sha>/         a model's held-out MLM figures and fine-tuning results (cached by model)

1. Hash every input file; the files whose content the champion has not seen (``retrain.json`` of the run that
   made it) are new. Nothing new: the run ends there, saying so.
2. New files form a batch (or reuse a batch made for them before, e.g. by a rejected run) that is sharded
   alone; old batches' shards and examples are reused through their manifests and never written.
3. The champion's vocabulary is kept (continued pretraining must not move token ids); the UNK rate of the new
   text under it is compared with the champion's, with a warning past ``retrain.unk_drift_warning``.
4. ``mix/``: an examples directory whose manifest lists hard links to every new train part and a seeded
   sample of old ones (``retrain.new_fraction`` of the rows new), with the first run's valid split as its
   valid split. The trainer reads it like any examples directory; no example is copied or rewritten.
5. Pretraining from the champion's weights (fresh optimizer, short warmup) for ``retrain.max_steps`` or
   ``retrain.time_budget``; the first run (empty registry) trains from scratch with the ``pretrain`` section.
6. Challenger and champion are evaluated on the same held-out examples (the first run's valid split) and
   fine-tuned on the configured tasks; the ``gate`` decides; the challenger is registered, and promoted
   only if the gate holds. Nothing reaches the registry before evaluation, so a killed run changes nothing.

A writer lock on ROOT keeps two runs (a schedule, a manual run) from working on one root at once; the
deployment's concurrency limit queues the scheduled ones.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_prep.manifest import (
    StageError,
    acquire_writer_lock,
    fingerprint,
    read_json,
    read_manifest,
    release_writer_lock,
    sha256_file,
    verify,
    write_json_atomic,
)
from flows.config import (
    PipelineConfig,
    PipelineConfigError,
    build_stage_configs,
    default_shared,
    load_pipeline_config,
)
from flows.pipeline import (
    _artifact_slug,
    _value,
    examples_task,
    finetune_task,
    pretrain_task,
    shard_task,
    vocab_task,
)

RUN_RECORD = "retrain.json"


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

    def __post_init__(self) -> None:
        if not isinstance(self.finetune, dict) or not all(isinstance(v, str) for v in self.finetune.values()):
            raise ValueError('gate.finetune maps a task to its metric, e.g. {"cola": "mcc"}')
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


# --- what is new: pure functions over file hashes ------------------------------------------------------------


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


def gate_decision(rule: GateRule, champion: dict[str, float], challenger: dict[str, float]) -> dict:
    """``{"promote", "checks", "reason"}``: each check with both figures, its threshold and whether it held."""
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
    failed = [c for c in checks if not c["passed"]]
    if failed:
        reason = "; ".join(f"{c['metric']} {_fmt(c['challenger'])} vs champion {_fmt(c['champion'])} "
                           f"(needs {c['rule']})" for c in failed)  # fmt: skip
        return {"promote": False, "checks": checks, "reason": f"kept the champion: {reason}"}
    return {"promote": True, "checks": checks, "reason": "every gate check held"}


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


# --- the examples mix: hard links, one manifest -----------------------------------------------------------


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
    from data_prep.manifest import Stage, begin_stage, file_entry

    files = []
    sources = {"train": sorted((str(d), e["path"], e["sha256"]) for d, e in train),
               "valid": sorted((str(d), e["path"], e["sha256"]) for d, e in valid)}  # fmt: skip
    stage: Stage = begin_stage(out, "examples", {"mix": sources}, {}, 1)
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


def _parts(examples_dir: Path, split: str) -> list[tuple[Path, dict]]:
    manifest = read_manifest(examples_dir) or {"files": []}
    return [(examples_dir, e) for e in manifest["files"]
            if e["path"].startswith(f"{split}/") and e["path"].endswith(".arrow") and e.get("rows")]  # fmt: skip


# --- tasks -----------------------------------------------------------------------------------------------------


@task(name="find-new-data", cache_policy=NO_CACHE)
def find_new_data_task(inputs: list[str], seen: dict[str, str]) -> dict:
    """Hash the inputs; the files the champion has not seen."""
    current = content_hashes(inputs)
    new, changed = new_files(current, seen)
    return {"current": current, "new": new, "changed": changed}


def is_complete(directory: str | Path, stage: str) -> bool:
    """Whether ``directory`` holds a finished ``stage`` whose files match its manifest."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("stage") != stage:
        return False
    try:
        verify(directory, manifest)
    except StageError:
        return False
    return True


@task(name="unk-rate", cache_policy=NO_CACHE)
def unk_rate_task(vocab_dir: str, shard_dirs: list[str]) -> dict:
    """UNK rate, tokens and documents of the shards under the frozen vocabulary (``data_prep.vocab``)."""
    from data_prep.vocab import load_vocab, vocab_stats

    parts, documents = [], 0
    for directory in shard_dirs:
        manifest = read_manifest(directory)
        documents += manifest["stats"]["documents"]
        parts += [Path(directory) / e["path"] for e in manifest["files"]
                  if e["path"].endswith(".parquet") and e.get("rows")]  # fmt: skip
    return {**vocab_stats(load_vocab(vocab_dir), parts), "documents": documents}


@task(name="mix", cache_policy=NO_CACHE)
def mix_task(out: str, train: list, valid: list, vocab_dir: str) -> str:
    """The run's training examples: new parts and a sample of old ones, hard-linked (``build_mix``)."""
    build_mix(Path(out), train, valid, Path(vocab_dir))
    return out


def eval_dir(evals_root: Path, model_dir: Path) -> Path:
    """Where a model's evaluations are kept: by its weights, so a champion is evaluated once."""
    return evals_root / sha256_file(Path(model_dir) / "model.safetensors")[:16]


@task(name="heldout", task_run_name="heldout-{who}", cache_policy=NO_CACHE)
def heldout_task(who: str, model_dir: str, out: str, heldout: str, num_examples: int) -> dict[str, float]:
    """Held-out MLM loss and accuracy of one model (``bert.heldout``), cached in ``out`` by held-out set."""
    from bert.pretrain.heldout import evaluate_mlm

    heldout_fp = (read_manifest(heldout) or {}).get("fingerprint", "")[:16]
    cache = Path(out) / f"heldout-{heldout_fp}-{num_examples}.json"
    figures = read_json(cache)
    if figures is None:
        figures = evaluate_mlm(model_dir, heldout, "valid", max_examples=num_examples)
        write_json_atomic(cache, figures)
    return {f"heldout_{k}": float(figures[k]) for k in ("mlm_loss", "mlm_acc", "nsp_acc")}


def evaluate(who: str, model_dir: Path, evals_root: Path, heldout: Path, num_examples: int,
             finetune: list) -> dict[str, float]:  # fmt: skip
    """Held-out figures and each task's median (``<task>_<metric>``; absent when every seed is degenerate)."""
    directory = eval_dir(evals_root, model_dir)
    metrics = heldout_task(who, str(model_dir), str(directory), str(heldout), num_examples)
    for ft in finetune:
        config = dataclasses.replace(ft, model=str(model_dir), out=str(directory / f"finetune-{ft.task}"))
        summary = _value(finetune_task.with_options(task_run_name=f"finetune-{ft.task}-{who}")(config))
        value = (summary.get("median") or {}).get(summary.get("metric"))
        if isinstance(value, int | float):
            metrics[f"{ft.task}_{summary['metric']}"] = float(value)
    return metrics


# --- the flow -----------------------------------------------------------------------------------------------


def _next_run_dir(root: Path) -> Path:
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in runs.iterdir() if p.name.isdigit()]
    run_dir = runs / str(max(numbers, default=0) + 1)
    run_dir.mkdir()
    return run_dir


def _known_batches(root: Path) -> list[dict]:
    directory = root / "data" / "batches"
    return [b for p in sorted(directory.glob("*.json")) if (b := read_json(p))] if directory.is_dir() else []


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


@flow(name="bert-retrain", log_prints=True)
def retrain(
    config: str = "retrain-demo",
    overrides: list[str] | None = None,
    out: str = "runs/retrain-demo",
    shared: str | None = None,
    pretrain_timeout_s: float | None = None,
) -> dict:
    """Continue pretraining the champion on what is new in the corpus; promote the result if the gate holds.

    ``config`` is a retrain preset (``configs/pipeline/retrain-demo.json``), ``overrides`` flat
    ``section.key=value`` strings (``retrain.*`` and ``gate.*`` included), ``out`` the root of every run.
    """
    logger = get_run_logger()
    settings = load_retrain_config(config, overrides or ())
    shared_data = Path(shared or default_shared()) / "data"
    root = Path(out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    acquire_writer_lock(root)  # one retraining run per root, whoever started it
    try:
        return _retrain(settings, shared_data, root, pretrain_timeout_s, logger)
    finally:
        release_writer_lock(root)


def _retrain(settings: RetrainConfig, shared_data: Path, root: Path, pretrain_timeout_s, logger) -> dict:
    from flows import report
    from flows.registry import Registry

    started = time.monotonic()
    registry = Registry(root)
    champion = registry.champion()
    record = read_json(Path(champion.lineage["run_dir"]) / RUN_RECORD) if champion else None
    if champion is not None and record is None:
        raise StageError(f"the champion (version {champion.version}) has no {RUN_RECORD} in "
                         f"{champion.lineage.get('run_dir')}: its corpus is unknown")  # fmt: skip
    data = root / "data"
    template = build_stage_configs(settings.pipeline, shared_data, data / ".template")
    shard_settings = {k: v for k, v in template.shard.output_config().items() if k != "inputs"}

    found = find_new_data_task(template.shard.inputs, record["corpus_files"] if record else {})
    summary: dict[str, Any] = {
        "root": str(root), "champion": champion.version if champion else None,
        "new_files": sorted(found["new"]), "changed_files": found["changed"], "flow_run_id": _flow_run_id(),
    }  # fmt: skip
    slug = _artifact_slug(settings.pipeline.name)
    if not found["new"]:
        summary |= {"decision": "nothing-new", "reason": f"no input file is new or changed since version "
                    f"{champion.version}'s corpus ({len(found['current'])} files, all seen)"}  # fmt: skip
        logger.info("retrain: %s; nothing to train", summary["reason"])
        _markdown(report.render_retrain_markdown(summary), slug)
        return summary

    run_dir = _next_run_dir(root)
    summary["run_dir"] = str(run_dir)
    logger.info(
        "retrain: %d new and %d changed files → %s", len(found["new"]), len(found["changed"]), run_dir
    )

    # 1. shard what is new, batch by batch (reusing a batch sharded before)
    batches = assign_batches(found["new"], _known_batches(root), shard_settings)
    for batch in batches:
        write_json_atomic(data / "batches" / f"{batch['id']}.json", batch)
        shard_config = dataclasses.replace(template.shard, inputs=sorted(batch["files"]),
                                           out=str(data / f"shards-{batch['id']}"))  # fmt: skip
        if is_complete(shard_config.out, "shard"):  # named by content: a complete one is never re-sharded
            logger.info("retrain: reusing %s", shard_config.out)
        else:
            shard_task.with_options(task_run_name=f"shard-{batch['id']}")(shard_config)
    old_ids = record["batches"] if record else []
    new_ids = [b["id"] for b in batches if b["id"] not in old_ids]

    # 2. the vocabulary: the champion's, or trained on the first batch
    if record:
        vocab_dir = record["vocab_dir"]
    else:
        from data_prep import vocab as vocab_stage

        vocab_config = dataclasses.replace(template.vocab, corpus=str(data / f"shards-{new_ids[0]}"), out="")
        vocab_config.out = str(data / f"vocab-{vocab_stage.expected_fingerprint(vocab_config)[:16]}")
        vocab_dir = _value(vocab_task(vocab_config))
    unk = unk_rate_task(vocab_dir, [str(data / f"shards-{i}") for i in new_ids])
    champion_unk = record["unk_tokens"] / max(1, record["tokens"]) if record else None
    drift = None if champion_unk is None else unk["unk_rate"] - champion_unk
    summary["new_data"] = {"files": len(found["new"]), "documents": unk["documents"], "tokens": unk["tokens"],
                           "unk_rate": unk["unk_rate"], "champion_unk_rate": champion_unk, "unk_drift": drift,
                           "batches": new_ids}  # fmt: skip
    if drift is not None and drift > settings.retrain.unk_drift_warning:
        summary["warning"] = (f"UNK rate of the new text {unk['unk_rate']:.2%} is {drift:.2%} above the champion's "
                              f"{champion_unk:.2%} (warning past {settings.retrain.unk_drift_warning:.2%}): the "
                              "frozen vocabulary covers it less well; consider a new root with a new vocabulary")  # fmt: skip
        logger.warning("retrain: %s", summary["warning"])

    # 3. examples per batch (old ones Cached), named by fingerprint so a setting change never rebuilds one
    from data_prep import examples_stage

    examples_dirs = {}
    for batch_name in [*old_ids, *new_ids]:
        seed = (template.examples.seed + int(batch_name[:8], 16)) % (1 << 31)  # no two batches share masks
        ex_config = dataclasses.replace(template.examples, corpus=data / f"shards-{batch_name}",
                                        vocab=Path(vocab_dir), out=Path(""), seed=seed)  # fmt: skip
        ex_config.out = data / f"examples-{examples_stage.expected_fingerprint(ex_config)[:16]}"
        examples_dirs[batch_name] = Path(_value(examples_task(ex_config)))
    heldout = Path(record["heldout"]) if record else examples_dirs[new_ids[0]]
    if not _parts(heldout, "valid"):
        raise StageError(f"{heldout} has no valid examples to hold out: raise shard.valid_fraction")

    # 4. the mix: every new train part and a sample of old ones
    new_parts = [p for i in new_ids for p in _parts(examples_dirs[i], "train")]
    old_parts = [p for i in old_ids for p in _parts(examples_dirs[i], "train")]
    new_rows = sum(e["rows"] for _, e in new_parts)
    target = round(new_rows * (1 - settings.retrain.new_fraction) / settings.retrain.new_fraction)
    by_key = {f"{d}/{e['path']}": (d, e) for d, e in old_parts}
    sampled = sample_old_parts(
        [(k, e["rows"]) for k, (_, e) in by_key.items()], target, settings.retrain.seed
    )
    train_parts = new_parts + [by_key[k] for k, _ in sampled]
    mix = mix_task(str(run_dir / "mix"), train_parts, _parts(heldout, "valid"), vocab_dir)
    summary["mix"] = {"new_rows": new_rows, "old_rows": sum(r for _, r in sampled), "old_parts": len(sampled),
                      "old_parts_available": len(old_parts)}  # fmt: skip

    # 5. pretrain: from the champion's weights, or from scratch on the first run
    train_config = dataclasses.replace(
        template.pretrain, examples=mix, out=str(run_dir / "pretrain"), vocab=vocab_dir
    )
    if champion is not None:
        r = settings.retrain
        train_config = dataclasses.replace(
            train_config, init_from=str(champion.hf_dir), max_steps=r.max_steps, time_budget=r.time_budget,
            warmup_steps=r.warmup_steps, lr=r.lr or train_config.lr, schedule_steps=None,
            decay=train_config.decay if r.max_steps is not None else "constant",
        )  # fmt: skip
    hf_dir = Path(
        _value(pretrain_task(train_config, template.num_gpus, template.hostfile, pretrain_timeout_s))
    )

    # 6. evaluate both on the same held-out set and tasks, decide, register, promote
    evals, n, tasks = root / "evals", settings.retrain.heldout_examples, template.finetune
    challenger = evaluate("challenger", hf_dir, evals, heldout, n, tasks)
    incumbent = evaluate("champion", champion.hf_dir, evals, heldout, n, tasks) if champion else {}
    if champion is None:
        decision = {"promote": True, "checks": [], "reason": "first model: nothing to compare against"}
    else:
        decision = gate_decision(settings.gate, incumbent, challenger)
    pretrain_manifest = read_manifest(run_dir / "pretrain") or {}
    record_out = {
        "corpus_files": {**(record["corpus_files"] if record else {}), **found["new"]},
        "batches": [*old_ids, *new_ids], "vocab_dir": str(vocab_dir), "heldout": str(heldout),
        "unk_tokens": (record["unk_tokens"] if record else 0) + unk["unk_tokens"],  # the corpus so far
        "tokens": (record["tokens"] if record else 0) + unk["tokens"],
        "parent_version": champion.version if champion else None, "decision": decision,
    }  # fmt: skip
    write_json_atomic(
        run_dir / RUN_RECORD, record_out
    )  # before the registry: a version always has its record
    from data_prep.vocab import load_vocab

    lineage = {
        "corpus": fingerprint(sorted(record_out["corpus_files"].values())), "batches": ",".join(record_out["batches"]),
        "vocab": load_vocab(vocab_dir).fingerprint, "examples": (read_manifest(mix) or {}).get("fingerprint", ""),
        "pretrain": pretrain_manifest.get("fingerprint", ""), "heldout": str(heldout),
        "parent_version": str(champion.version) if champion else "", "run_dir": str(run_dir),
        "flow_run_id": summary["flow_run_id"],
    }  # fmt: skip
    version = registry.register(hf_dir, challenger, lineage)
    if decision["promote"]:
        registry.promote(version.version, decision["reason"])
    summary |= {"version": version.version, "decision": "promoted" if decision["promote"] else "rejected",
                "reason": decision["reason"], "checks": decision["checks"], "challenger_metrics": challenger,
                "champion_metrics": incumbent, "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    write_json_atomic(run_dir / RUN_RECORD, {**record_out, "version": version.version, "summary": summary})
    logger.info("retrain: version %s %s (%s)", version.version, summary["decision"], decision["reason"])
    _markdown(report.render_retrain_markdown(summary), slug)
    return summary


def _markdown(markdown: str, slug: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=f"{slug}-retrain", description="bertpipe retraining run")


__all__ = ["GateRule", "RetrainConfig", "RetrainSettings", "gate_decision", "load_retrain_config", "retrain"]
