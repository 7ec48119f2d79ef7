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
   ``retrain.json`` holds the figures and lineage the version was registered with and a log of its promotions,
   so ``bertpipe models rebuild`` can register every run again if the registry is lost.

Before any work (``open_champion``, also run by the CLI before Prefect starts): a registry that cannot be read, no
champion while ROOT holds earlier runs, or a champion whose weights are gone is refused in one line that says
how to recover; a run never silently starts from scratch beside an earlier lineage.

A writer lock on ROOT keeps two runs (a schedule, a manual run) from working on one root at once; the
deployment's concurrency limit queues the scheduled ones. The rules of each step (settings, what is new, batches,
the mix, the gate) are plain functions in ``flows/retrain_plan.py``; this module holds the flow and its tasks.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_prep.manifest import (
    StageError,
    acquire_writer_lock,
    complete_manifest,
    read_json,
    release_writer_lock,
    write_json_atomic,
)
from flows.config import build_stage_configs, default_shared
from flows.pipeline import (
    artifact_slug,
    baseline_task,
    examples_task,
    finetune_task,
    pretrain_task,
    shard_task,
    task_value,
    vocab_task,
)
from flows.retrain_plan import (
    RUN_RECORD,
    RetrainConfig,
    assign_batches,
    batch_seed,
    build_mix,
    check_champion_artifact,
    content_hashes,
    continued_pretraining,
    eval_dir,
    evaluated_record,
    example_parts,
    gate_decision,
    heldout_figures,
    known_batches,
    lift_key,
    lineage,
    load_retrain_config,
    new_files,
    new_text_stats,
    next_run_dir,
    plan_mix,
    refuse_fresh_start,
    run_record,
    unk_drift,
)

if TYPE_CHECKING:
    from flows.registry import ModelVersion, Registry

# --- tasks: a call of a plain function (flows/retrain_plan.py) each --------------------------------------------


@task(name="find-new-data", cache_policy=NO_CACHE)
def find_new_data_task(inputs: list[str], seen: dict[str, str]) -> dict:
    """Hash the inputs; the files the champion has not seen."""
    current = content_hashes(inputs)
    new, changed = new_files(current, seen)
    return {"current": current, "new": new, "changed": changed}


@task(name="unk-rate", cache_policy=NO_CACHE)
def unk_rate_task(vocab_dir: str, shard_dirs: list[str]) -> dict:
    """UNK rate, tokens and documents of the shards under the frozen vocabulary (``new_text_stats``)."""
    return new_text_stats(vocab_dir, shard_dirs)


@task(name="mix", cache_policy=NO_CACHE)
def mix_task(out: str, train: list, valid: list, vocab_dir: str) -> str:
    """The run's training examples: new parts and a sample of old ones, hard-linked (``build_mix``)."""
    build_mix(Path(out), train, valid, Path(vocab_dir))
    return out


@task(name="heldout", task_run_name="heldout-{who}", cache_policy=NO_CACHE)
def heldout_task(who: str, model_dir: str, out: str, heldout: str, num_examples: int) -> dict[str, float]:
    """Held-out MLM loss and accuracy of one model, cached in ``out`` by held-out set (``heldout_figures``)."""
    return heldout_figures(model_dir, out, heldout, num_examples)


def evaluate(who: str, model_dir: Path, evals_root: Path, heldout: Path, num_examples: int,
             finetune: list, lift_tasks: tuple[str, ...] = ()) -> dict[str, float]:  # fmt: skip
    """Held-out figures and each task's median (``<task>_<metric>``; absent when every seed is degenerate);
    for ``lift_tasks`` also the lift over random initialisation (``<task>_<metric>_lift``, as the report's)."""
    from bert.finetune.baselines import RANDOM_INIT
    from bert.finetune.metrics import lift, scored_values

    directory = eval_dir(evals_root, model_dir)
    metrics = heldout_task(who, str(model_dir), str(directory), str(heldout), num_examples)
    for ft in finetune:
        config = dataclasses.replace(ft, model=str(model_dir), out=str(directory / f"finetune-{ft.task}"))
        summary = task_value(finetune_task.with_options(task_run_name=f"finetune-{ft.task}-{who}")(config))
        value = (summary.get("median") or {}).get(summary.get("metric"))
        if isinstance(value, int | float):
            metrics[f"{ft.task}_{summary['metric']}"] = float(value)
        if ft.task in lift_tasks:
            # one fingerprint for every model of this architecture and vocabulary: fine-tuned once per root
            baseline = task_value(
                baseline_task(config, RANDOM_INIT, str(evals_root / "baselines"), RANDOM_INIT)
            )
            # the report's lift: seeds that predicted one class count at what they measured
            measured = lift(scored_values(summary, degenerate=True),
                            scored_values(baseline["metrics"], degenerate=True))["lift"]  # fmt: skip
            if isinstance(measured, float):
                metrics[lift_key(ft.task, summary["metric"])] = measured
    return metrics


# --- the flow -----------------------------------------------------------------------------------------------


def open_champion(root: Path) -> tuple[Registry, ModelVersion | None, dict | None]:
    """(the registry under ``root``, its champion or None, the champion's run record); StageError or
    RegistryDamaged (one line each, saying what to do) when retraining must not start: a registry that cannot be
    read, earlier runs but no champion, a champion whose weights or record are gone. Called by the CLI before
    Prefect starts, and by the flow."""
    from flows.registry import Registry

    registry = Registry(root)
    champion = registry.champion()
    if champion is None:
        refuse_fresh_start(root, registry.uri, len(registry.versions(download=False)))
        return registry, None, None
    run_dir = champion.lineage.get("run_dir")
    check_champion_artifact(root, champion.version, champion.hf_dir, run_dir)
    record = read_json(Path(run_dir) / RUN_RECORD) if run_dir else None
    if record is None:
        raise StageError(f"the champion (version {champion.version}) has no {RUN_RECORD} in "
                         f"{run_dir}: its corpus is unknown")  # fmt: skip
    return registry, champion, record


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

    started = time.monotonic()
    registry, champion, record = open_champion(root)
    data = root / "data"
    template = build_stage_configs(settings.pipeline, shared_data, data / ".template")
    shard_settings = {k: v for k, v in template.shard.output_config().items() if k != "inputs"}

    found = find_new_data_task(template.shard.inputs, record["corpus_files"] if record else {})
    summary: dict[str, Any] = {
        "root": str(root), "champion": champion.version if champion else None,
        "new_files": sorted(found["new"]), "changed_files": found["changed"], "flow_run_id": _flow_run_id(),
    }  # fmt: skip
    slug = artifact_slug(settings.pipeline.name)
    if not found["new"]:
        summary |= {"decision": "nothing-new", "reason": f"no input file is new or changed since version "
                    f"{champion.version}'s corpus ({len(found['current'])} files, all seen)"}  # fmt: skip
        logger.info("retrain: %s; nothing to train", summary["reason"])
        _markdown(report.render_retrain_markdown(summary), slug)
        return summary

    run_dir = next_run_dir(root)
    summary["run_dir"] = str(run_dir)
    logger.info(
        "retrain: %d new and %d changed files → %s", len(found["new"]), len(found["changed"]), run_dir
    )

    # 1. shard what is new, batch by batch (reusing a batch sharded before)
    batches = assign_batches(found["new"], known_batches(root), shard_settings)
    for batch in batches:
        write_json_atomic(data / "batches" / f"{batch['id']}.json", batch)
        shard_config = dataclasses.replace(template.shard, inputs=sorted(batch["files"]),
                                           out=str(data / f"shards-{batch['id']}"))  # fmt: skip
        # Named by content, not by its inputs' paths: a complete one is never re-sharded, whatever its fingerprint.
        if complete_manifest(shard_config.out, "shard") is not None:
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
        vocab_dir = task_value(vocab_task(vocab_config))
    new_text = unk_rate_task(vocab_dir, [str(data / f"shards-{i}") for i in new_ids])
    new_data, warning = unk_drift(record, new_text, settings.retrain.unk_drift_warning)
    summary["new_data"] = {"files": len(found["new"]), **new_data, "batches": new_ids}
    if warning:
        summary["warning"] = warning
        logger.warning("retrain: %s", warning)

    # 3. examples per batch (old ones Cached), named by fingerprint so a setting change never rebuilds one
    from data_prep import examples_stage

    examples_dirs = {}
    for batch_name in [*old_ids, *new_ids]:
        ex_config = dataclasses.replace(template.examples, corpus=data / f"shards-{batch_name}",
                                        vocab=Path(vocab_dir), out=Path(""),
                                        seed=batch_seed(template.examples.seed, batch_name))  # fmt: skip
        ex_config.out = data / f"examples-{examples_stage.expected_fingerprint(ex_config)[:16]}"
        examples_dirs[batch_name] = Path(task_value(examples_task(ex_config)))
    heldout = Path(record["heldout"]) if record else examples_dirs[new_ids[0]]
    if not example_parts(heldout, "valid"):
        raise StageError(f"{heldout} has no valid examples to hold out: raise shard.valid_fraction")

    # 4. the mix: every new train part and a sample of old ones
    train_parts, summary["mix"] = plan_mix(
        [p for i in new_ids for p in example_parts(examples_dirs[i], "train")],
        [p for i in old_ids for p in example_parts(examples_dirs[i], "train")],
        settings.retrain.new_fraction, settings.retrain.seed,
    )  # fmt: skip
    mix = mix_task(str(run_dir / "mix"), train_parts, example_parts(heldout, "valid"), vocab_dir)

    # 5. pretrain: from the champion's weights, or from scratch on the first run
    train_config = dataclasses.replace(
        template.pretrain, examples=mix, out=str(run_dir / "pretrain"), vocab=vocab_dir
    )
    if champion is not None:
        train_config = continued_pretraining(train_config, settings.retrain, champion.hf_dir)
    hf_dir = Path(
        task_value(pretrain_task(train_config, template.num_gpus, template.hostfile, pretrain_timeout_s))
    )

    # 6. evaluate both on the same held-out set and tasks, decide, register, promote
    evals, n, tasks = root / "evals", settings.retrain.heldout_examples, template.finetune
    lift_tasks = tuple(settings.gate.finetune) if settings.gate.min_lift is not None else ()
    challenger = evaluate("challenger", hf_dir, evals, heldout, n, tasks, lift_tasks)
    incumbent = evaluate("champion", champion.hf_dir, evals, heldout, n, tasks) if champion else None
    decision = gate_decision(settings.gate, incumbent, challenger)
    parent = champion.version if champion else None
    record_out = run_record(record, found["new"], [*old_ids, *new_ids], vocab_dir, heldout, new_text, parent,
                            decision)  # fmt: skip
    registered_with = lineage(record_out, mix, run_dir, parent, summary["flow_run_id"])
    # Before the registry: a version always has its record, and the record what `models rebuild` registers again.
    record_path = run_dir / RUN_RECORD
    write_json_atomic(record_path, evaluated_record(record_out, challenger, registered_with))
    version = registry.register(hf_dir, challenger, registered_with)
    write_json_atomic(record_path, {**(read_json(record_path) or record_out), "version": version.version})
    if decision["promote"]:
        registry.promote(version.version, decision["reason"])  # notes the promotion in the record too
    summary |= {"version": version.version, "decision": "promoted" if decision["promote"] else "rejected",
                "reason": decision["reason"], "checks": decision["checks"], "challenger_metrics": challenger,
                "champion_metrics": incumbent or {}, "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    write_json_atomic(record_path, {**(read_json(record_path) or record_out), "summary": summary})
    logger.info("retrain: version %s %s (%s)", version.version, summary["decision"], decision["reason"])
    _markdown(report.render_retrain_markdown(summary), slug)
    return summary


def _markdown(markdown: str, slug: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown, key=f"{slug}-retrain", description="bertpipe retraining run")


__all__ = ["retrain"]
