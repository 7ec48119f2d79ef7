"""Fine-tuning and evaluation: ``main(FinetuneConfig) -> metrics`` over several seeds.

Per seed: build the task model from a Hugging Face directory (new head initialised from the seed), train
with AdamW (linear warmup then linear decay, gradient clipping) on dynamically padded batches, evaluate
after every epoch and keep the best epoch by the task metric. A seed whose best predictions are a single
class is *degenerate*: flagged, its scores left out, and excluded from the median/mean/std.

Writes, each atomically: ``OUT/metrics.json`` (the contract in DESIGN.md), ``OUT/config.json`` (the
resolved hyperparameters), ``OUT/predictions/seed-S.jsonl`` (``.json`` for QA, in the official SQuAD
prediction format) and ``OUT/model/`` (the best checkpoint of the best seed, with its tokenizer files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from bert.finetune import features, readers
from bert.finetune.config import FinetuneConfig
from bert.finetune.loop import SeedRun, train_seed
from bert.finetune.tasks import Task, get_task
from bert.model.hf import WEIGHT_FILES
from data_prep.manifest import begin_stage, file_entry, write_json_atomic, write_text_atomic
from data_prep.vocab import TOKENIZER_FILES

log = logging.getLogger("bert.finetune")


# -------------------------------------------------------------------------------------------- main


def resolve_hyperparameters(config: FinetuneConfig, task: Task) -> dict[str, Any]:
    """The run's effective hyperparameters: the config's, else the task's defaults."""
    return {
        "lr": config.lr if config.lr is not None else task.lr,
        "epochs": config.epochs or task.epochs,
        "batch_size": config.batch_size or task.batch_size,
        "max_seq_length": config.max_seq_length or task.max_seq_length,
    }


def _subsample(examples: list, limit: int | None) -> list:
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), limit))  # a fixed draw, order kept
    return [examples[i] for i in keep]


def prepare_data(config: FinetuneConfig, task: Task, hp: dict[str, Any]):
    """Read, check and featurise the train and eval data; returns (labels, data, tokenizer)."""
    tokenizer = features.load_tokenizer(config.model)
    train_examples = _subsample(readers.load_examples(task, config.train, "train"), config.max_train_examples)
    labels = readers.label_list(task, train_examples)
    eval_examples = _subsample(
        readers.load_examples(task, config.eval, "validation", labels), config.max_eval_examples
    )
    readers.check_labels(eval_examples, labels)
    max_len = hp["max_seq_length"]

    def featurise(examples, train: bool):
        if task.kind == "qa":
            return features.encode_squad(
                tokenizer, examples, max_len, config.doc_stride, config.max_query_length
            )
        if task.kind == "tagging":
            return features.encode_tagged(tokenizer, examples, max_len, labels)
        return features.encode_texts(tokenizer, examples, max_len, labels)

    data = {
        "train_features": featurise(train_examples, True),
        "eval_examples": eval_examples,
        "eval_features": featurise(eval_examples, False),
    }
    log.info("%s: %d training examples (%d features), %d evaluation examples (%d features); labels %s",
             task.name, len(train_examples), len(data["train_features"]), len(eval_examples),
             len(data["eval_features"]), labels)  # fmt: skip
    return labels, data


def summarise(task: Task, runs: list[SeedRun]) -> dict[str, Any]:
    """metrics.json: per-seed scores, and median/mean/std over the seeds that are not degenerate."""
    results, scored = [], []
    for run in runs:
        entry: dict[str, Any] = {"seed": run.seed}
        if run.evaluation.degenerate:
            entry.update({m: None for m in task.metrics})
            # what it measured anyway: a baseline comparison counts a seed that learned nothing at that value
            entry.update(
                degenerate=True, reason=run.evaluation.degenerate, measured=dict(run.evaluation.scores)
            )
        else:
            entry.update(run.evaluation.scores)
            scored.append(run.evaluation.scores)
        entry.update(best_epoch=run.best_epoch, train_seconds=round(run.train_seconds, 2), epochs=run.history)
        results.append(entry)
    scored_names = list(runs[0].evaluation.scores)
    names = [m for m in task.metrics if m in scored_names] + [
        m for m in scored_names if m not in task.metrics
    ]
    summary: dict[str, Any] = {
        "task": task.name,
        "metric": task.metric,
        "results": results,
        "median": {m: statistics.median(s[m] for s in scored) for m in names} if scored else {},
        "mean": {m: statistics.fmean(s[m] for s in scored) for m in names} if scored else {},
        "std": {m: (statistics.stdev(s[m] for s in scored) if len(scored) > 1 else 0.0) for m in names}
        if scored
        else {},
        "degenerate_seeds": [r.seed for r in runs if r.evaluation.degenerate],
    }
    if summary["degenerate_seeds"]:
        summary["note"] = (
            f"seeds {summary['degenerate_seeds']} predicted a single class and are excluded from "
            f"median/mean/std ({len(scored)} of {len(runs)} seeds scored)"
        )
    return summary


def _write_predictions(out: Path, task: Task, run: SeedRun) -> None:
    if task.kind == "qa":
        write_text_atomic(
            out / "predictions" / f"seed-{run.seed}.json", json.dumps(run.evaluation.predictions, indent=1)
        )
    else:
        lines = "".join(json.dumps(row) + "\n" for row in run.evaluation.predictions)
        write_text_atomic(out / "predictions" / f"seed-{run.seed}.jsonl", lines)


def _publish_model(out: Path, runs: list[SeedRun], task: Task, model_src: Path) -> int | None:
    """Move the best non-degenerate seed's checkpoint to OUT/model (with tokenizer files); drop the others."""
    candidates = [r for r in runs if r.model_dir is not None and not r.evaluation.degenerate]
    best = max(candidates, key=lambda r: r.evaluation.scores[task.metric], default=None)
    if best is not None:
        for name in TOKENIZER_FILES:
            if (model_src / name).is_file():
                shutil.copyfile(model_src / name, best.model_dir / name)  # not copy2: keep our umask's mode
        old = out / ".model-old.tmp"
        if (out / "model").exists():
            os.replace(out / "model", old)
        os.replace(best.model_dir, out / "model")  # a directory rename: atomic on one filesystem
        shutil.rmtree(old, ignore_errors=True)
    for r in runs:
        if r.model_dir is not None and r.model_dir.exists():
            shutil.rmtree(r.model_dir, ignore_errors=True)
    return None if best is None else best.seed


# --- the stage: fingerprint and manifest -------------------------------------------------------------------

STAGE, FORMAT_VERSION = "finetune", 1
# paths are inputs; the device changes only rounding (the precision is in the fingerprint)
NOT_IN_FINGERPRINT = ("model", "out", "train", "eval", "num_threads", "progress", "device")
MODEL_FILES = ("config.json", *WEIGHT_FILES, *TOKENIZER_FILES)


def _content_fingerprint(path: str | Path | None) -> str | None:
    """sha256 of a file; of every file (by relative path) of a directory; a dataset name as it is."""
    from data_prep.manifest import fingerprint, sha256_file

    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return fingerprint(
            {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
        )
    return f"name:{path}"


def stage_config(config: FinetuneConfig) -> dict:
    """The fingerprint's settings: every hyperparameter and task option, no paths."""
    values = dataclasses.asdict(config)
    if values["init"] == "pretrained":  # absent: fingerprints from before the setting existed still match
        del values["init"]
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k not in NOT_IN_FINGERPRINT
    }


def stage_inputs(config: FinetuneConfig) -> dict:
    """The model's weights, config and tokenizer files, and the train and eval data, by content.

    A random initialisation reads no weights, so they are left out: the baseline of every run whose model has
    the same architecture and tokenizer has one fingerprint, and is computed once."""
    from data_prep.manifest import fingerprint, sha256_file

    model = Path(config.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
    names = MODEL_FILES if config.init == "pretrained" else ("config.json", *TOKENIZER_FILES)
    files = {name: sha256_file(model / name) for name in names if (model / name).exists()}
    return {"model": fingerprint(files), "train": _content_fingerprint(config.train),
            "eval": _content_fingerprint(config.eval)}  # fmt: skip


def expected_fingerprint(config: FinetuneConfig) -> str:
    """The fingerprint of a complete fine-tuning of ``config``; computable before it runs."""
    from data_prep.manifest import stage_fingerprint

    return stage_fingerprint(STAGE, stage_config(config), stage_inputs(config), FORMAT_VERSION)


def _check_fits_the_model(config: FinetuneConfig, hp: dict[str, Any]) -> None:
    """ValueError, before any data is read, when the sequence length exceeds the model's positions."""
    config_file = Path(config.model, "config.json")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config.model} is not a model directory (no config.json)")
    try:
        positions = json.loads(config_file.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a JSON model config: {e}") from None
    if positions is not None and hp["max_seq_length"] > positions:
        raise ValueError(
            f"max_seq_length {hp['max_seq_length']} exceeds the {positions} positions of the model in "
            f"{config.model}: pass --max-seq-length {positions} or less"
        )


def main(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``config.model`` on the task once per seed; write and return metrics.json's content.

    OUT is a stage directory: a complete one for the same model, data and settings is returned as it is.
    """
    task = get_task(config.task, config.text_columns, config.label_column)
    hp = resolve_hyperparameters(config, task)
    out = Path(config.out)
    _check_fits_the_model(config, hp)
    stage = begin_stage(out, STAGE, stage_config(config), stage_inputs(config), FORMAT_VERSION)
    if stage.complete:
        log.info("finetune: %s is complete for this model, data and settings; nothing to do", out)
        return json.loads((out / "metrics.json").read_text())
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        summary = _run(config, task, hp, out)
    finally:
        torch.set_num_threads(threads)
    files = [file_entry(out, str(p.relative_to(out))) for p in sorted(out.rglob("*"))
             if p.is_file() and not p.name.startswith(".")]  # fmt: skip
    stage.commit(files, summary)
    return summary


def _run(config: FinetuneConfig, task: Task, hp: dict[str, Any], out: Path) -> dict[str, Any]:
    labels, data = prepare_data(config, task, hp)
    pad_id = (
        json.loads(Path(config.model, "config.json").read_text(encoding="utf-8")).get("pad_token_id") or 0
    )
    run_config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}
    write_json_atomic(out / "config.json", {**run_config, **hp, "labels": labels})
    runs = []
    for seed in config.seeds:
        run = train_seed(seed, config, hp, task, labels, data, pad_id, out if config.save_model else None)
        _write_predictions(out, task, run)
        runs.append(run)
        if run.evaluation.degenerate:
            log.warning("seed %d is degenerate (%s): not scored", seed, run.evaluation.degenerate)
    summary = summarise(task, runs)
    if config.save_model:
        best_seed = _publish_model(out, runs, task, Path(config.model))
        if best_seed is None:
            log.warning("every seed is degenerate: no model saved")
        else:
            log.info("saved the best checkpoint (seed %d) to %s", best_seed, out / "model")
    write_json_atomic(out / "metrics.json", summary)
    if summary["median"]:
        log.info("%s median over %d seeds: %s", task.name, len(runs) - len(summary["degenerate_seeds"]),
                 ", ".join(f"{k} {v:.4f}" for k, v in summary["median"].items()))  # fmt: skip
    return summary
