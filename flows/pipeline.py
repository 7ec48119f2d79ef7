"""The end-to-end pipeline: shard → vocab → examples → pretrain → finetune, one stage function each.

Each stage is a plain function with its own config (``data_prep`` and ``bert``); this module only passes
paths between them. Stages that are already complete for the same inputs and config return at once, so
``bertpipe run`` can be re-run after a crash or with one parameter changed and redoes only what changed.
A Prefect flow wraps the same calls (see the flows issue); this runner is what ``bertpipe run`` uses today.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.manifest import fingerprint, sha256_file

log = logging.getLogger("bertpipe.pipeline")

STAGES = ("shard", "vocab", "examples", "pretrain", "finetune")


@dataclass
class PipelineConfig:
    """A named pipeline preset (``configs/pipeline/*.json``): inputs and each stage's settings."""

    corpus: list[str]  # input paths; relative ones are read from the shared data directory
    shard: dict = field(default_factory=dict)  # data_prep.shard.ShardConfig fields
    vocab: dict = field(default_factory=dict)  # data_prep.vocab.VocabConfig fields
    examples: dict = field(default_factory=dict)  # data_prep.examples_stage.ExamplesConfig fields
    pretrain: dict = field(default_factory=dict)  # bert.train_config.TrainConfig fields, plus num_gpus
    finetune: list[dict] = field(default_factory=list)  # bert.finetune.FinetuneConfig fields, one per task
    name: str = "pipeline"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError('the pipeline config lists no corpus inputs: add paths under "corpus"')

    @classmethod
    def from_json_file(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"pipeline config {path} does not exist (presets live in configs/pipeline/)")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        unknown = set(values) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**values)


def _resolve(path: str, shared_data: Path) -> str:
    p = Path(path)
    if p.is_absolute() or path.startswith("hf://") or p.exists():
        return path
    return str(shared_data / path)


def run_shard(config: PipelineConfig, shared_data: Path, out: Path) -> Path:
    from data_prep.shard import ShardConfig, shard_corpus

    inputs = [_resolve(p, shared_data) for p in config.corpus]
    shard_corpus(ShardConfig(inputs=inputs, out=str(out / "corpus"), **config.shard))
    return out / "corpus"


def run_vocab(config: PipelineConfig, corpus: Path, shared_data: Path, out: Path) -> Path:
    from data_prep.vocab import VocabConfig, train_vocab

    settings = dict(config.vocab)
    if settings.get("from_path"):
        settings["from_path"] = _resolve(settings["from_path"], shared_data)
    train_vocab(VocabConfig(corpus=str(corpus), out=str(out / "vocab"), **settings))
    return out / "vocab"


def run_examples(config: PipelineConfig, corpus: Path, vocab: Path, out: Path) -> Path:
    from data_prep.examples_stage import ExamplesConfig, generate_examples

    generate_examples(ExamplesConfig(corpus=corpus, vocab=vocab, out=out / "examples", **config.examples))
    return out / "examples"


def run_pretrain(config: PipelineConfig, examples: Path, vocab: Path, out: Path) -> Path:
    """Pretrain through the deepspeed launcher; a finished run is kept, an interrupted one resumed."""
    from bert.pretrain import launch
    from bert.train_config import TrainConfig

    settings = dict(config.pretrain)
    num_gpus = settings.pop("num_gpus", 1)
    run_dir = out / "pretrain"
    result_file = run_dir / "result.json"
    if result_file.exists() and (run_dir / "hf" / "config.json").exists():
        result = json.loads(result_file.read_text())
        if result.get("stop_reason") == "max_steps" and result.get("step") == settings.get("max_steps"):
            log.info("pretrain: %s already finished %d steps; skipping", run_dir, result["step"])
            return run_dir / "hf"
    resume = (run_dir / "checkpoints" / "latest").exists()
    settings.setdefault("vocab", str(vocab))
    train_config = TrainConfig(examples=str(examples), out=str(run_dir), resume=resume, **settings)
    result = launch(train_config, num_gpus=num_gpus)
    return Path(result.hf_dir or run_dir / "hf")


def run_finetune(config: PipelineConfig, model: Path, shared_data: Path, out: Path) -> list[dict]:
    from bert.finetune import FinetuneConfig, main

    summaries = []
    for task in config.finetune:
        settings = dict(task)
        for key in ("train", "eval"):
            if settings.get(key):
                settings[key] = _resolve(settings[key], shared_data)
        if isinstance(settings.get("seeds"), list):
            settings["seeds"] = tuple(settings["seeds"])
        task_out = out / f"finetune-{settings['task']}"
        # Fine-tuning writes no stage manifest; skip it when the same settings already ran on the same weights.
        weights = Path(model) / "model.safetensors"
        key = fingerprint(
            {"settings": settings, "weights": sha256_file(weights) if weights.exists() else None}
        )
        done_file = task_out / ".pipeline_fingerprint"
        if (task_out / "metrics.json").exists() and done_file.exists() and done_file.read_text() == key:
            log.info("finetune %s: already done for these weights and settings; skipping", settings["task"])
            summaries.append(json.loads((task_out / "metrics.json").read_text()))
            continue
        summaries.append(main(FinetuneConfig(model=str(model), out=str(task_out), **settings)))
        done_file.write_text(key)
    return summaries


def run_pipeline(
    config: PipelineConfig, shared_data: str | Path, out: str | Path, stages: tuple[str, ...] = STAGES
) -> dict[str, Any]:
    """Run the stages in order (each skipped when already complete); return where each one wrote."""
    shared_data, out = Path(shared_data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    timings: dict[str, float] = {}
    outputs: dict[str, Any] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        log.info("── stage %s", name)
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 2)
        log.info("── stage %s done in %.1f s", name, timings[name])
        return result

    corpus, vocab, examples, model = out / "corpus", out / "vocab", out / "examples", out / "pretrain" / "hf"
    if "shard" in stages:
        corpus = outputs["corpus"] = timed("shard", run_shard, config, shared_data, out)
    if "vocab" in stages:
        vocab = outputs["vocab"] = timed("vocab", run_vocab, config, corpus, shared_data, out)
    if "examples" in stages:
        examples = outputs["examples"] = timed("examples", run_examples, config, corpus, vocab, out)
    if "pretrain" in stages and config.pretrain:
        model = outputs["model"] = timed("pretrain", run_pretrain, config, examples, vocab, out)
    if "finetune" in stages and config.finetune:
        outputs["finetune"] = timed("finetune", run_finetune, config, model, shared_data, out)
    summary = {"out": str(out), "timings_s": timings, **{k: v for k, v in outputs.items() if k != "finetune"}}
    if "finetune" in outputs:
        summary["finetune"] = [
            {"task": s.get("task"), "metric": s.get("metric"), "median": s.get("median")}
            for s in outputs["finetune"]
        ]
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
