"""Evaluation metrics for fine-tuning: pure Python over lists, no torch, no scikit-learn.

Classification (accuracy, binary/macro F1, Matthews correlation), regression (Pearson, Spearman),
entity-level precision/recall/F1 over IOB2 tags (the conlleval convention), and SQuAD exact match / F1
computed as the official v1.1/v2.0 evaluation scripts do.
"""

from __future__ import annotations

import collections
import math
import re
import statistics
import string
from collections.abc import Hashable, Sequence
from typing import Any

# ------------------------------------------------------------------------------------ classification


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Share of predictions equal to their reference."""
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def _precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    # An empty denominator scores 0, as scikit-learn's zero_division=0 and conlleval do.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def f1_score(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    positive: Hashable = 1,
    average: str = "binary",
) -> float:
    """F1 of the ``positive`` class (``average="binary"``) or the unweighted mean over classes ("macro")."""
    _check_lengths(predictions, references)
    if average == "binary":
        classes = [positive]
    elif average == "macro":
        classes = sorted(set(predictions) | set(references), key=repr)
    else:
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references, strict=True))
        fp = sum(p == c and r != c for p, r in zip(predictions, references, strict=True))
        fn = sum(p != c and r == c for p, r in zip(predictions, references, strict=True))
        scores.append(_precision_recall_f1(tp, fp, fn)[2])
    return sum(scores) / len(scores)


def matthews_corrcoef(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004); 0.0 when it is undefined (0/0).

    A constant prediction makes the denominator zero: scikit-learn returns 0 there too.
    """
    _check_lengths(predictions, references)
    n = len(references)
    pred_counts = collections.Counter(predictions)
    true_counts = collections.Counter(references)
    correct = sum(p == r for p, r in zip(predictions, references, strict=True))
    classes = set(pred_counts) | set(true_counts)
    cov_pt = correct * n - sum(pred_counts[c] * true_counts[c] for c in classes)
    cov_pp = n * n - sum(v * v for v in pred_counts.values())
    cov_tt = n * n - sum(v * v for v in true_counts.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


# ---------------------------------------------------------------------------------------- regression


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (undefined)."""
    _check_lengths(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties getting the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson over tie-averaged ranks."""
    _check_lengths(x, y)
    return pearson(_ranks(x), _ranks(y))


# ------------------------------------------------------------------------------- entity-level (IOB2)


def iob2_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, start, end_exclusive).

    conlleval's reading: an entity starts at ``B-X``, or at ``I-X`` that does not continue an ``X``
    entity, and runs over the following ``I-X``. ``O`` (and any tag without a ``B-``/``I-`` prefix) is outside.
    """
    entities = []
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            entities.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and label and not continues:
            kind, start = label, i
    return entities


def entity_scores(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 over sentences (an entity counts only if exact)."""
    _check_lengths(predictions, references)
    tp = num_pred = num_gold = 0
    for pred_tags, gold_tags in zip(predictions, references, strict=True):
        if len(pred_tags) != len(gold_tags):
            raise ValueError(f"a sentence has {len(pred_tags)} predicted tags but {len(gold_tags)} gold tags")
        pred, gold = set(iob2_entities(pred_tags)), set(iob2_entities(gold_tags))
        tp += len(pred & gold)
        num_pred += len(pred)
        num_gold += len(gold)
    precision, recall, f1 = _precision_recall_f1(tp, num_pred - tp, num_gold - tp)
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers; an empty answer matches only an empty answer (v2)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, each the max over an example's gold answers, averaged over examples.

    ``references`` maps question id to its gold answer texts; an empty list means unanswerable (v2),
    scored against the empty string as the v2.0 script does. A question without a prediction scores 0.
    """
    if not references:
        raise ValueError("no examples to score")
    exact = f1 = 0.0
    for qid, golds in references.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        prediction = predictions.get(qid)
        if prediction is None:
            continue
        exact += max(squad_exact(prediction, g) for g in golds)
        f1 += max(squad_f1(prediction, g) for g in golds)
    return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}


# --------------------------------------------------------------------------- lift over a baseline

NOISE_STANDARD_ERRORS = 2.0
"""A lift beyond this many standard errors of the difference counts as more than seed noise (about 95%)."""


def lift(pretrained: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """The pretrained model's seeds against a baseline's: medians, lift and whether it beats the seed noise.

    lift = median(pretrained) − median(baseline). The noise is NOISE_STANDARD_ERRORS standard errors of that
    difference, from the pooled seed standard deviation s: noise = 2·s·√(1/n₁ + 1/n₂). The verdict is
    "better" (lift > noise), "worse" (lift < −noise) or "within noise"; "too few seeds" when either side has
    fewer than 2 scored seeds (no estimate of the noise), "not scored" when either has none.
    """
    a, b = [float(x) for x in pretrained], [float(x) for x in baseline]
    result: dict[str, Any] = {"pretrained": None, "baseline": None, "lift": None, "noise": None,
                              "pooled_std": None, "verdict": "not scored"}  # fmt: skip
    if not a or not b:
        return result
    result["pretrained"], result["baseline"] = statistics.median(a), statistics.median(b)
    result["lift"] = result["pretrained"] - result["baseline"]
    if len(a) < 2 or len(b) < 2:
        result["verdict"] = "too few seeds"
        return result
    pooled_var = ((len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)) / (
        len(a) + len(b) - 2
    )
    result["pooled_std"] = pooled_var**0.5
    result["noise"] = NOISE_STANDARD_ERRORS * result["pooled_std"] * (1 / len(a) + 1 / len(b)) ** 0.5
    if result["lift"] > result["noise"]:
        result["verdict"] = "better"
    elif result["lift"] < -result["noise"]:
        result["verdict"] = "worse"
    else:
        result["verdict"] = "within noise"
    return result


def scored_values(
    summary: dict[str, Any] | None, metric: str | None = None, *, degenerate: bool = False
) -> list[float]:
    """The task metric of each scored (non-degenerate) seed of a metrics.json summary; with ``degenerate``
    also the seeds that predicted one class, at the value they measured (``measured``; older summaries lack it)."""
    if not isinstance(summary, dict) or not isinstance(summary.get("results"), list):
        return []
    metric = metric or summary.get("metric")
    values = []
    for result in summary["results"]:
        if not isinstance(result, dict) or (result.get("degenerate") and not degenerate):
            continue
        value = result.get(metric)
        if result.get("degenerate") and isinstance(result.get("measured"), dict):
            value = result["measured"].get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool):
            values.append(float(value))
    return values
