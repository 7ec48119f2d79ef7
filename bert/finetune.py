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
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bert import metrics as M
from bert import tasks as T
from data_prep.manifest import begin_stage, file_entry, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class FinetuneConfig:
    """One fine-tuning run; ``None`` hyperparameters take the task's default (see ``bert.tasks.TASKS``)."""

    task: str
    """Task name: cola, sst2, mrpc, rte, stsb, classification, regression, ner, squad, squad_v2."""
    model: str | Path
    """Hugging Face model directory (config.json, weights, tokenizer.json or vocab.txt)."""
    out: str | Path
    """Output directory."""
    train: str | Path | None = None
    """Training file (or save_to_disk directory); None: the task's standard dataset via datasets."""
    eval: str | Path | None = None
    """Evaluation file, as ``train``; None: the standard validation split."""
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_seq_length: int | None = None
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1
    """Share of the optimizer steps with a linear learning-rate warmup; then linear decay to 0."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, not applied to biases and LayerNorm weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    text_columns: tuple[str, ...] | None = None
    """Override the task's text columns: header names, or 0-based indices for files without a header."""
    label_column: str | None = None
    doc_stride: int = 128
    """QA: step between the starts of consecutive context windows, in tokens."""
    max_query_length: int = 64
    n_best: int = 20
    """QA: start and end candidates searched per window."""
    max_answer_length: int = 30
    """QA: longest answer span in tokens."""
    null_score_threshold: float = 0.0
    """SQuAD v2: answer "" when the no-answer score beats the best span by more than this."""
    max_train_examples: int | None = None
    """Train on a random subsample (fixed draw) of this many examples; None: all."""
    max_eval_examples: int | None = None
    num_threads: int | None = None
    """torch intra-op threads; None leaves torch's default."""
    device: str = "auto"
    """Where to train: "auto" (the GPU when CUDA is available, else the CPU), "cpu", "cuda" or "cuda:N"."""
    precision: str = "fp32"
    """"fp32", or "bf16" autocast (weights and optimizer stay fp32). At the tasks' batch sizes a GPU step is
    bound by kernel launches, not arithmetic, and autocast's casts make it slower (BERT-base, CoLA, batch 32,
    H200: 36 ms bf16 against 29 ms fp32), so fp32 is the default; bf16 pays off with large batches."""
    progress: bool = True
    """tqdm progress bars on stderr."""
    save_model: bool = True

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        for name in ("epochs", "batch_size", "max_seq_length", "eval_batch_size", "doc_stride",
                     "max_query_length", "n_best", "max_answer_length", "max_train_examples",
                     "max_eval_examples", "num_threads"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_seq_length is not None and self.max_seq_length < 8:
            raise ValueError(f"max_seq_length {self.max_seq_length} is too short to hold [CLS] text [SEP]")
        # The model directory is checked when the run starts: a pipeline builds this config before
        # pretraining has written the model.


# ------------------------------------------------------------------------------------------- helpers


def resolve_device(config: FinetuneConfig) -> tuple[torch.device, str]:
    """(device, precision) for ``config``: "auto" picks the GPU when there is one."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {config.device}: CUDA is not available here; use --device cpu")
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp32")
    return device, config.precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` (weights and optimizer stay fp32), or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``: through pinned memory and an asynchronous copy for a GPU."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence (dynamic padding); list labels are padded with IGNORE_INDEX."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((len(features), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
        "token_type_ids": torch.zeros(len(features), length, dtype=torch.long),
    }
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["token_type_ids"][i, :n] = torch.tensor(f["token_type_ids"])
    if "labels" in features[0]:
        first = features[0]["labels"]
        if isinstance(first, list):
            labels = torch.full((len(features), length), T.IGNORE_INDEX, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
            batch["labels"] = labels
        else:
            dtype = torch.float if isinstance(first, float) else torch.long
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
    for key in ("start_positions", "end_positions"):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
    return batch


def _model_class(task: T.Task):
    from bert import model as bert_model

    return {
        "classification": bert_model.BertForSequenceClassification,
        "regression": bert_model.BertForSequenceClassification,
        "tagging": bert_model.BertForTokenClassification,
        "qa": bert_model.BertForQuestionAnswering,
    }[task.kind]


def build_model(task: T.Task, labels: list[str] | None, model_dir: str | Path) -> torch.nn.Module:
    """The task model from ``model_dir``; heads the checkpoint lacks (or sizes differently) are new."""
    overrides: dict[str, Any]
    if task.kind == "regression":
        overrides = {"num_labels": 1, "id2label": {0: "score"}, "problem_type": "regression"}
    elif task.kind == "qa":
        overrides = {"num_labels": 2, "id2label": {0: "start", 1: "end"}}
    else:
        overrides = {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
        if task.kind == "classification":
            overrides["problem_type"] = "single_label_classification"
    overrides["label2id"] = {v: k for k, v in overrides["id2label"].items()}  # else the checkpoint's stays
    return _model_class(task).from_pretrained(model_dir, ignore_mismatched_sizes=True, **overrides)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int, warmup_steps: int
):
    """AdamW (no decay on biases and LayerNorm) and a linear warmup / linear decay schedule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    on_gpu = any(p.is_cuda for p in decay + no_decay)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        fused=True if on_gpu else None,  # one kernel for every parameter on a GPU; torch's default elsewhere
    )

    def factor(step: int) -> float:  # the schedule of transformers' get_linear_schedule_with_warmup
        if step < warmup_steps:
            return step / warmup_steps  # 0 on the first step, lr after warmup_steps steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    scores: dict[str, float]
    predictions: Any  # per example; written to predictions/seed-S
    degenerate: str | None  # why the predictions are degenerate, or None


@torch.no_grad()
def _forward_all(
    model, features, batch_size: int, pad_id: int, keys: tuple[str, ...], precision: str = "fp32"
) -> list[list[torch.Tensor]]:
    """Model outputs ``keys`` per feature, unpadded (each a float32 CPU tensor of that feature's length)."""
    model.eval()
    device = next(model.parameters()).device
    outputs: list[list[torch.Tensor]] = [[] for _ in keys]
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        batch = collate([{k: f[k] for k in ("input_ids", "token_type_ids")} for f in chunk], pad_id)
        with autocast(device, precision):
            out = model(**to_device(batch, device))
        for i, key in enumerate(keys):
            values = getattr(out, key).float().cpu()
            for j, f in enumerate(chunk):
                # sequence logits are (B, num_labels); per-token outputs lose their padding
                whole = key == "logits" and values.ndim == 2
                outputs[i].append(values[j] if whole else values[j][: len(f["input_ids"])])
    return outputs


def evaluate(
    model, task: T.Task, labels, examples, features, config: FinetuneConfig, pad_id: int,
    precision: str = "fp32",
) -> Evaluation:  # fmt: skip
    """Scores of ``model`` on the evaluation features, with per-example predictions and the degeneracy check."""
    if task.kind == "qa":
        starts, ends = _forward_all(
            model, features, config.eval_batch_size, pad_id, ("start_logits", "end_logits"), precision
        )
        predictions = squad_predictions(examples, features, starts, ends, config)
        scores = M.squad_scores(predictions, {e.qid: [a[0] for a in e.answers] for e in examples})
        degenerate = None
        if task.version_2 and all(p == "" for p in predictions.values()):
            degenerate = "predicted no answer for every question"
        return Evaluation(scores, predictions, degenerate)
    (logits,) = _forward_all(model, features, config.eval_batch_size, pad_id, ("logits",), precision)
    if task.kind == "regression":
        predicted = [float(x[0]) for x in logits]
        gold = [float(e.label) for e in examples]
        scores = {"pearson": M.pearson(predicted, gold), "spearman": M.spearman(predicted, gold)}
        spread = max(predicted) - min(predicted)
        degenerate = f"predicted the constant {predicted[0]:.4g} for every example" if spread < 1e-6 else None
        rows = [
            {"index": i, "prediction": p, "label": g}
            for i, (p, g) in enumerate(zip(predicted, gold, strict=True))
        ]
        return Evaluation(scores, rows, degenerate)
    if task.kind == "tagging":
        predicted_tags = []
        for e, f, x in zip(examples, features, logits, strict=True):
            tags = ["O"] * len(e.words)  # words past max_seq_length stay "O" (and count as misses)
            for position, label_id in enumerate(x.argmax(-1).tolist()):
                if f["word_index"][position] >= 0:
                    tags[f["word_index"][position]] = labels[label_id]
            predicted_tags.append(tags)
        gold_tags = [e.tags for e in examples]
        scores = M.entity_scores(predicted_tags, gold_tags)
        used = {t for tags in predicted_tags for t in tags}
        degenerate = f"predicted the tag {used.pop()!r} for every word" if len(used) == 1 else None
        rows = [{"index": i, "words": e.words, "prediction": p, "label": e.tags}
                for i, (e, p) in enumerate(zip(examples, predicted_tags, strict=True))]  # fmt: skip
        return Evaluation(scores, rows, degenerate)
    predicted = [labels[int(x.argmax())] for x in logits]
    gold = [e.label for e in examples]
    scores = {}
    for name in task.metrics:
        if name == "accuracy":
            scores[name] = M.accuracy(predicted, gold)
        elif name == "mcc":
            scores[name] = M.matthews_corrcoef(predicted, gold)
        elif name == "f1":
            scores[name] = M.f1_score(predicted, gold, positive=labels[-1])
        elif name == "macro_f1":
            scores[name] = M.f1_score(predicted, gold, average="macro")
    used = set(predicted)
    degenerate = (
        f"predicted the class {predicted[0]!r} for all {len(predicted)} examples" if len(used) == 1 else None
    )
    rows = [
        {"index": i, "prediction": p, "label": g}
        for i, (p, g) in enumerate(zip(predicted, gold, strict=True))
    ]
    return Evaluation(scores, rows, degenerate)


def squad_predictions(examples, features, start_logits, end_logits, config: FinetuneConfig) -> dict[str, str]:
    """Best answer text per question: n-best start x end search over every window of its context.

    A span is valid when both ends lie in the context, end >= start and it is at most max_answer_length
    tokens; its score is start + end logit. For v2 the no-answer score is the lowest [CLS] score over the
    windows, and "" is predicted when it beats the best span by more than null_score_threshold.
    """
    by_example: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        by_example.setdefault(f["example_index"], []).append(i)
    predictions = {}
    version_2 = T.get_task(config.task).version_2
    for example_index, e in enumerate(examples):
        best_score, best_text, null_score = -math.inf, "", math.inf
        for i in by_example.get(example_index, []):
            s, t, offsets = start_logits[i], end_logits[i], features[i]["offsets"]
            null_score = min(null_score, float(s[0] + t[0]))
            top_starts = torch.topk(s, min(config.n_best, len(s))).indices.tolist()
            top_ends = torch.topk(t, min(config.n_best, len(t))).indices.tolist()
            for a in top_starts:
                for b in top_ends:
                    if (
                        offsets[a] is None
                        or offsets[b] is None
                        or b < a
                        or b - a + 1 > config.max_answer_length
                    ):
                        continue
                    score = float(s[a] + t[b])
                    if score > best_score:
                        best_score, best_text = score, e.context[offsets[a][0] : offsets[b][1]]
        if version_2 and null_score - best_score > config.null_score_threshold:
            best_text = ""
        predictions[e.qid] = best_text
    return predictions


# ------------------------------------------------------------------------------------------ training


@dataclass
class SeedRun:
    seed: int
    evaluation: Evaluation  # of the best epoch
    best_epoch: int
    history: list[dict[str, Any]]  # per epoch: train_loss, scores
    train_seconds: float
    model_dir: Path | None  # best checkpoint, saved under a temporary name


def _better(candidate: Evaluation, best: Evaluation | None, metric: str) -> bool:
    """A non-degenerate epoch beats a degenerate one; otherwise the higher task metric wins."""
    if best is None:
        return True
    return (candidate.degenerate is None, candidate.scores[metric]) > (
        best.degenerate is None,
        best.scores[metric],
    )


def train_seed(
    seed: int,
    config: FinetuneConfig,
    hp: dict[str, Any],
    task: T.Task,
    labels: list[str] | None,
    data: dict[str, Any],
    pad_id: int,
    save_dir: Path | None,
) -> SeedRun:
    """Fine-tune one seed: the seed fixes the head initialisation, dropout and batch order."""
    train_features = data["train_features"]
    batch_size, epochs = hp["batch_size"], hp["epochs"]
    steps_per_epoch = math.ceil(len(train_features) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(config.warmup_ratio * total_steps)
    history: list[dict[str, Any]] = []
    best: Evaluation | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    device, precision = resolve_device(config)
    gpus = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):  # the global RNG (init, dropout) is seeded, then restored
        torch.manual_seed(seed)
        model = build_model(task, labels, config.model).to(device)
        optimizer, scheduler = make_optimizer(model, hp["lr"], config.weight_decay, total_steps, warmup_steps)
        order_rng = torch.Generator().manual_seed(seed)
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(train_features), generator=order_rng).tolist()
            losses = []  # on the device: reading each loss would wait for the GPU every step
            bar = tqdm(range(steps_per_epoch), desc=f"seed {seed} epoch {epoch}/{epochs}", file=sys.stderr,
                       disable=not config.progress, leave=False, dynamic_ncols=True)  # fmt: skip
            for step in bar:
                batch = collate(
                    [train_features[i] for i in order[step * batch_size : (step + 1) * batch_size]], pad_id
                )
                with autocast(device, precision):
                    loss = model(**to_device(batch, device)).loss
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
                if config.progress and (step % 20 == 0 or step == steps_per_epoch - 1):
                    bar.set_postfix(loss=f"{torch.stack(losses).mean().item():.4f}", refresh=False)
            bar.close()
            evaluation = evaluate(
                model, task, labels, data["eval_examples"], data["eval_features"], config, pad_id, precision
            )
            train_loss = torch.stack(losses).mean().item() if losses else 0.0
            history.append({"epoch": epoch, "train_loss": train_loss, **evaluation.scores,
                            "degenerate": evaluation.degenerate is not None})  # fmt: skip
            log.info("seed %d epoch %d: train loss %.4f, %s%s", seed, epoch, train_loss,
                     ", ".join(f"{k} {v:.4f}" for k, v in evaluation.scores.items()),
                     f" (degenerate: {evaluation.degenerate})" if evaluation.degenerate else "")  # fmt: skip
            if _better(evaluation, best, task.metric):
                best, best_epoch = evaluation, epoch
                if save_dir is not None:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        train_seconds = time.perf_counter() - started
        model_dir = None
        if save_dir is not None and best_state is not None:
            model.load_state_dict(best_state)
            model_dir = save_dir / f".model-seed-{seed}.tmp"
            shutil.rmtree(model_dir, ignore_errors=True)
            model.save_pretrained(model_dir)
    assert best is not None
    return SeedRun(seed, best, best_epoch, history, train_seconds, model_dir)


# -------------------------------------------------------------------------------------------- main


def resolve_hyperparameters(config: FinetuneConfig, task: T.Task) -> dict[str, Any]:
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


def prepare_data(config: FinetuneConfig, task: T.Task, hp: dict[str, Any]):
    """Read, check and featurise the train and eval data; returns (labels, data, tokenizer)."""
    tokenizer = T.load_tokenizer(config.model)
    train_examples = _subsample(T.load_examples(task, config.train, "train"), config.max_train_examples)
    labels = T.label_list(task, train_examples)
    eval_examples = _subsample(
        T.load_examples(task, config.eval, "validation", labels), config.max_eval_examples
    )
    T.check_labels(eval_examples, labels)
    max_len = hp["max_seq_length"]

    def featurise(examples, train: bool):
        if task.kind == "qa":
            return T.encode_squad(tokenizer, examples, max_len, config.doc_stride, config.max_query_length)
        if task.kind == "tagging":
            return T.encode_tagged(tokenizer, examples, max_len, labels)
        return T.encode_texts(tokenizer, examples, max_len, labels)

    data = {
        "train_features": featurise(train_examples, True),
        "eval_examples": eval_examples,
        "eval_features": featurise(eval_examples, False),
    }
    log.info("%s: %d training examples (%d features), %d evaluation examples (%d features); labels %s",
             task.name, len(train_examples), len(data["train_features"]), len(eval_examples),
             len(data["eval_features"]), labels)  # fmt: skip
    return labels, data


def summarise(task: T.Task, runs: list[SeedRun]) -> dict[str, Any]:
    """metrics.json: per-seed scores, and median/mean/std over the seeds that are not degenerate."""
    results, scored = [], []
    for run in runs:
        entry: dict[str, Any] = {"seed": run.seed}
        if run.evaluation.degenerate:
            entry.update({m: None for m in task.metrics})
            entry.update(degenerate=True, reason=run.evaluation.degenerate)
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


def _write_predictions(out: Path, task: T.Task, run: SeedRun) -> None:
    if task.kind == "qa":
        write_text_atomic(
            out / "predictions" / f"seed-{run.seed}.json", json.dumps(run.evaluation.predictions, indent=1)
        )
    else:
        lines = "".join(json.dumps(row) + "\n" for row in run.evaluation.predictions)
        write_text_atomic(out / "predictions" / f"seed-{run.seed}.jsonl", lines)


def _publish_model(out: Path, runs: list[SeedRun], task: T.Task, model_src: Path) -> int | None:
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
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", *TOKENIZER_FILES)


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
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k not in NOT_IN_FINGERPRINT
    }


def stage_inputs(config: FinetuneConfig) -> dict:
    """The model's weights, config and tokenizer files, and the train and eval data, by content."""
    from data_prep.manifest import fingerprint, sha256_file

    model = Path(config.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
    files = {name: sha256_file(model / name) for name in MODEL_FILES if (model / name).exists()}
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
    task = T.get_task(config.task, config.text_columns, config.label_column)
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


def _run(config: FinetuneConfig, task: T.Task, hp: dict[str, Any], out: Path) -> dict[str, Any]:
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
