"""One seed of fine-tuning: build the task model, train with AdamW, evaluate after every epoch, keep the best."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bert.finetune import metrics as M
from bert.finetune.config import FinetuneConfig, resolve_device
from bert.finetune.features import collate
from bert.finetune.tasks import Task, get_task
from bert.optim import lr_multiplier, parameter_groups

log = logging.getLogger("bert.finetune")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` (weights and optimizer stay fp32), or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``: through pinned memory and an asynchronous copy for a GPU."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _model_class(task: Task):
    from bert import model as bert_model

    return {
        "classification": bert_model.BertForSequenceClassification,
        "regression": bert_model.BertForSequenceClassification,
        "tagging": bert_model.BertForTokenClassification,
        "qa": bert_model.BertForQuestionAnswering,
    }[task.kind]


def build_model(
    task: Task, labels: list[str] | None, model_dir: str | Path, init: str = "pretrained"
) -> torch.nn.Module:
    """The task model from ``model_dir``; heads the checkpoint lacks (or sizes differently) are new.

    ``init="random"`` builds the same architecture from ``model_dir``'s config.json at BERT's initialisation
    (from the global RNG, which the caller seeds) and never reads its weights."""
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
    cls = _model_class(task)
    if init == "random":
        return cls(cls.config_class.from_json_file(Path(model_dir), **overrides)).eval()
    return cls.from_pretrained(model_dir, ignore_mismatched_sizes=True, **overrides)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int, warmup_steps: int
):
    """AdamW over pretraining's parameter groups (no decay on biases and LayerNorm) and its schedule,
    ``bert.optim.lr_multiplier``: linear warmup, then linear decay to 0 at ``total_steps``."""
    groups = parameter_groups(model, weight_decay)
    on_gpu = any(p.is_cuda for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(
        groups,
        lr=lr,
        fused=True if on_gpu else None,  # one kernel for every parameter on a GPU; torch's default elsewhere
    )

    def factor(step: int) -> float:  # LambdaLR asks for step 0 before the first update, as the engine does
        return lr_multiplier(step, warmup_steps, total_steps, "linear")

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
    model, task: Task, labels, examples, features, config: FinetuneConfig, pad_id: int,
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
    version_2 = get_task(config.task).version_2
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
    task: Task,
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
        model = build_model(task, labels, config.model, config.init).to(device)
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
