"""The human-readable report of a pipeline run: headline figures, training curves and a Markdown page.

Everything here reads finished stage directories (``corpus/``, ``vocab/``, ``examples/``, ``pretrain/``,
``finetune-<task>/``) and never raises over a missing stage, file or key: a report of a half-finished run
shows what is there. No Prefect import: ``flows/pipeline.py`` turns these strings, bytes and rows into
Prefect artifacts, and the CLI and tests call them directly.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from data_prep.manifest import read_manifest

# (figure key, label, kind) per report section; the kind decides how a value and a change are printed.
CORPUS_ROWS = (
    ("corpus.documents", "documents", "count"),
    ("corpus.train_documents", "train documents", "count"),
    ("corpus.valid_documents", "valid documents", "count"),
    ("corpus.sentences", "sentences", "count"),
    ("corpus.words", "words", "count"),
    ("corpus.bytes", "text", "bytes"),
    ("corpus.empty_dropped", "empty documents dropped", "count"),
    ("corpus.duplicates_dropped", "duplicates dropped", "count"),
    ("corpus.bad_records_dropped", "bad records dropped", "count"),
    ("corpus.decode_fallback_files", "files decoded with the fallback", "count"),
    ("corpus.decode_fallback_lines", "lines decoded with the fallback", "count"),
    ("corpus.binary_files_skipped", "binary files skipped", "count"),
    ("corpus.unreadable_files", "unreadable files", "count"),
)
VOCAB_ROWS = (
    ("vocab.size", "vocabulary size", "count"),
    ("vocab.unk_rate", "UNK rate", "rate"),
    ("vocab.tokens_per_word", "tokens per word", "ratio"),
    ("vocab.stats_split", "measured on split", "text"),
)
EXAMPLES_ROWS = (
    ("examples.count", "examples", "count"),
    ("examples.tokens", "tokens", "count"),
    ("examples.mean_length", "mean length (tokens)", "sig4"),
    ("examples.nsp_random_share", "NSP: B is a random segment", "share"),
    ("examples.masked_share_of_tokens", "tokens chosen for prediction", "share"),
    ("examples.masked_share_mask", "predicted tokens shown as [MASK]", "share"),
    ("examples.masked_share_random", "predicted tokens shown as a random token", "share"),
    ("examples.masked_share_keep", "predicted tokens kept", "share"),
    ("examples.truncated_share", "examples truncated", "share"),
    ("examples.prediction_cap_share", "examples at the prediction cap", "share"),
    ("examples.padding_share_if_fixed_length", "padding if stored at fixed length", "share"),
)
PRETRAIN_ROWS = (
    ("pretrain.steps", "steps", "count"),
    ("pretrain.stop_reason", "stopped by", "text"),
    ("pretrain.num_layers", "layers", "count"),
    ("pretrain.hidden_size", "hidden size", "count"),
    ("pretrain.final_loss", "final loss", "sig4"),
    ("pretrain.final_mlm_loss", "final MLM loss", "sig4"),
    ("pretrain.final_nsp_loss", "final NSP loss", "sig4"),
    ("pretrain.final_mlm_acc", "final MLM accuracy", "share"),
    ("pretrain.final_nsp_acc", "final NSP accuracy", "share"),
    ("pretrain.eval_step", "evaluated at step", "count"),
    ("pretrain.eval_loss", "eval loss", "sig4"),
    ("pretrain.eval_mlm_loss", "eval MLM loss", "sig4"),
    ("pretrain.eval_nsp_loss", "eval NSP loss", "sig4"),
    ("pretrain.eval_mlm_acc", "eval MLM accuracy", "share"),
    ("pretrain.eval_nsp_acc", "eval NSP accuracy", "share"),
    ("pretrain.median_tokens_per_s", "tokens/s (median over steps)", "speed"),
)
# Where each figure of a data stage sits in its manifest's stats.
STAGE_STATS = {
    "corpus": (
        ("corpus.documents", ("documents",)),
        ("corpus.train_documents", ("splits", "train", "documents")),
        ("corpus.valid_documents", ("splits", "valid", "documents")),
        ("corpus.sentences", ("sentences",)),
        ("corpus.words", ("words",)),
        ("corpus.bytes", ("bytes",)),
        ("corpus.empty_dropped", ("dropped", "empty")),
        ("corpus.duplicates_dropped", ("dropped", "duplicate")),
        ("corpus.bad_records_dropped", ("dropped", "bad_records")),
        ("corpus.decode_fallback_files", ("decode_fallback_files",)),
        ("corpus.decode_fallback_lines", ("decode_fallback_lines",)),
        ("corpus.binary_files_skipped", ("binary_files_skipped",)),
        ("corpus.unreadable_files", ("unreadable_files",)),
    ),
    "vocab": (
        ("vocab.size", ("vocab_size",)),
        ("vocab.unk_rate", ("unk_rate",)),
        ("vocab.tokens_per_word", ("tokens_per_word",)),
        ("vocab.stats_split", ("stats_split",)),
    ),
    "examples": (
        ("examples.count", ("examples",)),
        ("examples.tokens", ("tokens",)),
        ("examples.mean_length", ("mean_length",)),
        ("examples.nsp_random_share", ("nsp_random_next_share",)),
        ("examples.masked_share_of_tokens", ("masked_share_of_tokens",)),
        ("examples.masked_share_mask", ("masked_as_mask_share",)),
        ("examples.masked_share_random", ("masked_as_random_share",)),
        ("examples.masked_share_keep", ("masked_kept_share",)),
        ("examples.truncated_share", ("truncated_share",)),
        ("examples.prediction_cap_share", ("prediction_cap_share",)),
        ("examples.padding_share_if_fixed_length", ("padding_share_if_fixed_length",)),
    ),
}
FINETUNE_PREFIX = "finetune-"
TASK_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "ner": "NER",
              "squad": "SQuAD", "squad_v2": "SQuAD 2.0"}  # fmt: skip
METRIC_NAMES = {"f1": "F1", "accuracy": "accuracy", "mcc": "Matthews correlation", "exact_match": "exact match",
                "pearson": "Pearson correlation", "spearman": "Spearman correlation"}  # fmt: skip
NO_FIGURE = "—"
BASELINE_RULE = (
    "Lift: the pretrained model's median minus the baseline's, over the same seeds and settings (degenerate "
    "seeds left out). Noise: two standard errors of that difference from the pooled seed standard deviation "
    "s, 2·s·√(1/n₁ + 1/n₂). The lift is *better* or *worse* only beyond it; each side needs 2 scored seeds."
)


# --- reading ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stats(directory: Path | None) -> dict:
    """The stats of a complete stage directory; {} when it is missing or unfinished."""
    if directory is None:
        return {}
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError):
        return {}
    stats = manifest.get("stats") if manifest else None
    return stats if isinstance(stats, dict) else {}


def _read_metrics_jsonl(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a pretrain metrics.jsonl; unreadable lines are skipped."""
    train, evals = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return train, evals
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            continue
        if "loss" in record:
            train.append(record)
        elif "eval_loss" in record:
            evals.append(record)
    return train, evals


def _finetune_dirs(stage_dirs: dict[str, Path]) -> list[tuple[str, Path]]:
    return sorted(
        (k[len(FINETUNE_PREFIX) :], Path(v)) for k, v in stage_dirs.items() if k.startswith(FINETUNE_PREFIX)
    )


def _finetune_metrics(directory: Path) -> dict | None:
    data = _read_json(directory / "metrics.json")
    return data if isinstance(data, dict) and isinstance(data.get("results"), list) else None


def _put(figures: dict, key: str, value: Any) -> None:
    """Keep JSON-friendly scalars only (a wrong type in a stats file is left out, not reported)."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float | str):
        figures[key] = value


def _dig(stats: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(stats, dict):
            return None
        stats = stats.get(key)
    return stats


def _dir(stage_dirs: dict[str, Path], name: str) -> Path | None:
    return Path(stage_dirs[name]) if stage_dirs.get(name) else None


# --- figures -------------------------------------------------------------------------------------------


def collect_figures(stage_dirs: dict[str, Path]) -> dict:
    """The headline figures of a run as one flat JSON-serialisable dict; absent stages give no keys."""
    figures: dict[str, Any] = {}
    for stage, paths in STAGE_STATS.items():
        stats = _stats(_dir(stage_dirs, stage))
        for key, path in paths:
            _put(figures, key, _dig(stats, path))

    pretrain = _dir(stage_dirs, "pretrain")
    if pretrain is not None:
        _pretrain_figures(pretrain, figures)

    for task, directory in _finetune_dirs(stage_dirs):
        data = _finetune_metrics(directory)
        if data is None:
            continue
        metric = data.get("metric")
        _put(figures, f"finetune.{task}.metric", metric)
        _put(figures, f"finetune.{task}.seeds", len(data["results"]))
        degenerate = data.get("degenerate_seeds")
        if isinstance(degenerate, list):
            figures[f"finetune.{task}.degenerate_seeds"] = len(degenerate)
        for summary in ("median", "mean", "std"):
            values = data.get(summary) if isinstance(data.get(summary), dict) else {}
            for name, value in values.items():
                if summary == "median" or name == metric:  # mean/std of the task metric only
                    _put(figures, f"finetune.{task}.{name}.{summary}", value)
    if _baseline_dirs(stage_dirs):
        for row in baseline_rows(stage_dirs):
            _put(figures, f"finetune.{row['task']}.{row['metric']}.lift.{row['baseline']}", row["lift"])
    return figures


def _pretrain_figures(directory: Path, figures: dict) -> None:
    """Final train metrics, the last evaluation and the model size; result.json wins over metrics.jsonl.

    result.json holds the very last step, which ``log_every`` may have left out of metrics.jsonl.
    """
    train, evals = _read_metrics_jsonl(directory / "metrics.jsonl")
    result = _read_json(directory / "result.json")
    result = result if isinstance(result, dict) else {}
    final = result.get("metrics") if isinstance(result.get("metrics"), dict) and result["metrics"] else None
    final = final or (train[-1] if train else {})
    last_eval = result.get("eval_metrics") if isinstance(result.get("eval_metrics"), dict) else None
    if last_eval:  # result.json's eval metrics carry no eval_ prefix
        last_eval = {k if k == "step" else f"eval_{k}": v for k, v in last_eval.items()}
    last_eval = last_eval or (evals[-1] if evals else {})
    _put(figures, "pretrain.steps", result.get("step", final.get("step")))
    _put(figures, "pretrain.stop_reason", result.get("stop_reason"))
    for key in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"):
        _put(figures, f"pretrain.final_{key}", final.get(key))
    _put(figures, "pretrain.eval_step", last_eval.get("step"))
    for key in ("eval_loss", "eval_mlm_loss", "eval_nsp_loss", "eval_mlm_acc", "eval_nsp_acc"):
        _put(figures, f"pretrain.{key}", last_eval.get(key))
    speeds = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), int | float)]
    if speeds:
        figures["pretrain.median_tokens_per_s"] = statistics.median(speeds)
    config = _read_json(directory / "hf" / "config.json")
    if isinstance(config, dict):
        _put(figures, "pretrain.num_layers", config.get("num_hidden_layers"))
        _put(figures, "pretrain.hidden_size", config.get("hidden_size"))


def _row(task: str, metric: str | None, seed: Any, value: Any, degenerate: bool) -> dict:
    return {"task": task, "metric": metric, "seed": seed, "value": value, "degenerate": degenerate}


def evaluation_rows(stage_dirs: dict[str, Path]) -> list[dict]:
    """One row per (task, seed) and a median row per task, for a table artifact; degenerate seeds unscored."""
    rows = []
    for task, directory in _finetune_dirs(stage_dirs):
        data = _finetune_metrics(directory)
        if data is None:
            continue
        task = data.get("task") or task
        metric = data.get("metric")
        flagged = data.get("degenerate_seeds") if isinstance(data.get("degenerate_seeds"), list) else []
        scored = 0
        for result in data["results"]:
            if not isinstance(result, dict):
                continue
            degenerate = bool(result.get("degenerate")) or result.get("seed") in flagged
            value = None if degenerate else result.get(metric)
            scored += value is not None
            rows.append(_row(task, metric, result.get("seed"), value, degenerate))
        median = data.get("median") if isinstance(data.get("median"), dict) else {}
        rows.append(_row(task, metric, "median", median.get(metric), degenerate=scored == 0))
    return rows


def _baseline_dirs(stage_dirs: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """task -> baseline label -> its fine-tuning directory, from the run's baselines.json; {} without one."""
    path = _dir(stage_dirs, "baselines")
    data = _read_json(path) if path is not None else None
    if not isinstance(data, dict):
        return {}
    return {
        task: {label: Path(d) for label, d in entries.items() if isinstance(d, str)}
        for task, entries in data.items()
        if isinstance(entries, dict)
    }


def baseline_rows(stage_dirs: dict[str, Path]) -> list[dict]:
    """One row per (task, baseline): the pretrained model's and the baseline's medians over their seeds, the
    lift, the noise it is held against and the verdict (``bert.finetune.metrics.lift``). A seed that predicted
    one class counts at the value it measured (a random init that learned nothing is a result, not a gap)."""
    from bert.finetune.metrics import lift, scored_values

    pretrained = {task: _finetune_metrics(directory) for task, directory in _finetune_dirs(stage_dirs)}
    rows = []
    for task, entries in sorted(_baseline_dirs(stage_dirs).items()):
        ours = pretrained.get(task)
        metric = (ours or {}).get("metric")
        for label, directory in entries.items():
            theirs = _finetune_metrics(directory)
            metric = metric or (theirs or {}).get("metric")
            a = scored_values(ours, metric, degenerate=True)
            b = scored_values(theirs, metric, degenerate=True)
            verdict = lift(a, b)
            rows.append({"task": task, "metric": metric, "baseline": label,
                         "pretrained_median": verdict["pretrained"], "baseline_median": verdict["baseline"],
                         "lift": verdict["lift"], "noise": verdict["noise"], "verdict": verdict["verdict"],
                         "pretrained_seeds": len(a), "baseline_seeds": len(b)})  # fmt: skip
    return rows


# --- the training curves ---------------------------------------------------------------------------------


def training_curves_png(metrics_jsonl: Path) -> bytes | None:
    """Loss, MLM accuracy and NSP accuracy per step (train lines, eval points) as a small PNG; None if empty."""
    train, evals = _read_metrics_jsonl(Path(metrics_jsonl))
    if not train and not evals:
        return None
    # The object API, not pyplot: no global backend switch, safe inside a worker thread.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 2.6), dpi=80, layout="constrained")
    loss_ax, mlm_ax, nsp_ax = figure.subplots(1, 3)

    def series(records: list[dict], key: str) -> tuple[list, list]:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        return [p[0] for p in points], [p[1] for p in points]

    losses = (("loss", "total", "C0"), ("mlm_loss", "MLM", "C1"), ("nsp_loss", "NSP", "C2"))
    for key, label, color in losses:
        loss_ax.plot(*series(train, key), color=color, linewidth=1, label=label)
    for key, _, color in losses:  # eval points in the colour of their train line; one legend entry
        label = "eval" if key == "loss" else None
        loss_ax.plot(*series(evals, f"eval_{key}"), "o", color=color, markersize=3, label=label)
    for ax, key, title in ((mlm_ax, "mlm_acc", "MLM accuracy"), (nsp_ax, "nsp_acc", "NSP accuracy")):
        ax.plot(*series(train, key), color="C0", linewidth=1, label="train")
        ax.plot(*series(evals, f"eval_{key}"), "o", color="C3", markersize=3, label="eval")
        ax.set_title(title, fontsize=9)
    loss_ax.set_title("loss", fontsize=9)
    for ax in (loss_ax, mlm_ax, nsp_ax):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, linewidth=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, frameon=False)
    buffer = io.BytesIO()
    # No "Software" entry (matplotlib's version): the same records give the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# --- formatting ---------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_value(value: Any, kind: str) -> str:
    """A figure as a person reads it: counts with separators, shares as %, losses to 4 significant digits."""
    if value is None:
        return NO_FIGURE
    if not _is_number(value) or kind == "text":
        return str(value)
    if kind == "count":
        return f"{value:,.0f}"
    if kind == "share":
        return f"{100 * value:.1f}%"
    if kind == "rate":
        return f"{100 * value:.2f}%"
    if kind == "sig4":  # losses: 4 significant digits, trailing zeros kept (3.000, 0.6931)
        return f"{value:#.4g}".rstrip(".")
    if kind == "bytes":
        return f"{value / 1e6:.2f} MB"
    if kind == "speed":
        return f"{value:,.0f}"
    if kind == "score":
        return f"{value:.4f}"
    return f"{value:.3f}"  # ratio


def format_change(value: Any, previous: Any, kind: str) -> str:
    """This run minus the previous one, in the figure's own unit (percentage points for shares)."""
    if value is None or previous is None:
        return NO_FIGURE
    if not (_is_number(value) and _is_number(previous)) or kind == "text":
        return "same" if value == previous else "changed"
    delta = value - previous
    if delta == 0:
        return "same"
    relative = f" ({100 * delta / previous:+.1f}%)" if previous else ""
    if kind == "count":
        return f"{delta:+,.0f}{relative}"
    if kind == "share":
        return f"{100 * delta:+.1f} pp"
    if kind == "rate":
        return f"{100 * delta:+.2f} pp"
    if kind == "sig4":
        return f"{delta:+#.4g}".rstrip(".")
    if kind == "bytes":
        return f"{delta / 1e6:+.2f} MB{relative}"
    if kind == "speed":
        return f"{delta:+,.0f}{relative}"
    if kind == "score":
        return f"{delta:+.4f}"
    return f"{delta:+.3f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _figure_table(rows: Sequence[tuple[str, str, str]], figures: dict, previous: dict | None) -> list[str]:
    """A two-column table (figure | this run), or four with the previous run and the change."""
    shown = [row for row in rows if row[0] in figures or (previous and row[0] in previous)]
    if not shown:
        return ["Not run (no finished stage directory)."]
    if previous is None:
        lines = ["| figure | this run |", "|---|---:|"]
        lines += [
            f"| {label} | {_cell(format_value(figures.get(key), kind))} |" for key, label, kind in shown
        ]
        return lines
    lines = ["| figure | this run | previous run | change |", "|---|---:|---:|---:|"]
    for key, label, kind in shown:
        this, before = figures.get(key), previous.get(key)
        cells = (format_value(this, kind), format_value(before, kind), format_change(this, before, kind))
        lines.append(f"| {label} | " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _code_block(text: str) -> list[str]:
    fence = "```"
    while fence in text:  # a longer fence than any backtick run inside keeps the block closed
        fence += "`"
    return [fence, text, fence]


def _decoded_example(examples_dir: Path | None) -> list[str]:
    example = _stats(examples_dir).get("example")
    if not isinstance(example, dict) or not example.get("tokens"):
        return []
    lines = [f"tokens:         {example['tokens']}"]
    if example.get("token_type_ids"):
        lines.append(f"token_type_ids: {example['token_type_ids']}")
    label = example.get("next_sentence_label")
    if label is not None:
        meaning = "B is a random segment" if label == 1 else "B follows A"
        lines.append(f"next_sentence:  {label} ({meaning})")
    if example.get("masked_lm"):
        lines.append(f"masked_lm:      {example['masked_lm']}")
    intro = "One decoded example (masked_lm: position:original token of each prediction):"
    return ["", intro, "", *_code_block("\n".join(lines))]


def _finetune_section(stage_dirs: dict[str, Path], previous: dict | None) -> list[str]:
    rows = evaluation_rows(stage_dirs)
    if not rows:
        return ["Not run (no metrics.json)."]
    tasks: dict[str, dict] = {}
    for row in rows:
        entry = tasks.setdefault(row["task"], {"metric": row["metric"], "seeds": {}, "median": None})
        if row["seed"] == "median":
            entry["median"] = row
        else:
            entry["seeds"][row["seed"]] = row
    seeds = sorted({s for entry in tasks.values() for s in entry["seeds"]}, key=str)
    header = ["task", "metric", *(f"seed {s}" for s in seeds), "median"]
    if previous is not None:
        header += ["previous median", "change"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for task, entry in tasks.items():
        cells = [task, entry["metric"]]
        for seed in seeds:
            row = entry["seeds"].get(seed)
            if row is None:
                cells.append(NO_FIGURE)
            else:
                cells.append(
                    "degenerate, not scored" if row["degenerate"] else format_value(row["value"], "score")
                )
        median = entry["median"]["value"]
        cells.append("no seed scored" if median is None and entry["seeds"] else format_value(median, "score"))
        if previous is not None:
            before = previous.get(f"finetune.{task}.{entry['metric']}.median")
            cells += [format_value(before, "score"), format_change(median, before, "score")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    reasons = _degenerate_reasons(stage_dirs)
    if reasons:
        lines += ["", "Degenerate seeds (a single prediction for every example; left out of the median):", ""]
        lines += [f"- {task} seed {seed}: {reason}" for task, seed, reason in reasons]
    return lines


def _baseline_section(stage_dirs: dict[str, Path]) -> list[str]:
    rows = baseline_rows(stage_dirs)
    if not rows:
        return []
    header = ["task", "metric", "baseline", "pretrained median", "baseline median", "lift", "noise",
              "verdict"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * 4 + "---|"]
    for row in rows:
        lift = row["lift"]
        cells = [row["task"], row["metric"], row["baseline"], format_value(row["pretrained_median"], "score"),
                 format_value(row["baseline_median"], "score"),
                 NO_FIGURE if lift is None else f"{lift:+.4f}",
                 NO_FIGURE if row["noise"] is None else f"±{row['noise']:.4f}",
                 f"{row['verdict']} ({row['pretrained_seeds']} vs {row['baseline_seeds']} seeds)"]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, "", BASELINE_RULE]


def _degenerate_reasons(stage_dirs: dict[str, Path]) -> list[tuple[str, Any, str]]:
    reasons = []
    for task, directory in _finetune_dirs(stage_dirs):
        data = _finetune_metrics(directory) or {"results": []}
        for result in data["results"]:
            if isinstance(result, dict) and result.get("degenerate"):
                reasons.append(
                    (data.get("task") or task, result.get("seed"), str(result.get("reason", "flagged")))
                )
    return reasons


def render_markdown(
    figures: dict,
    stage_dirs: dict[str, Path],
    previous: dict | None = None,
    png: bytes | None = None,
    notes: Iterable[str] = (),
) -> str:
    """The run report in Markdown; with ``previous`` (the last completed run's figures) side by side."""
    lines = ["# bertpipe run report", ""]
    if previous is not None:
        lines += ["Each table puts this run beside the previous completed run.", ""]
    lines += ["## Corpus", "", *_figure_table(CORPUS_ROWS, figures, previous), ""]
    lines += ["## Tokenizer", "", *_figure_table(VOCAB_ROWS, figures, previous), ""]
    lines += ["## Examples", "", *_figure_table(EXAMPLES_ROWS, figures, previous)]
    lines += [*_decoded_example(_dir(stage_dirs, "examples")), ""]
    lines += ["## Pretraining", "", *_figure_table(PRETRAIN_ROWS, figures, previous), ""]
    if png:
        encoded = base64.b64encode(png).decode("ascii")
        lines += [f"![training curves](data:image/png;base64,{encoded})", ""]
    lines += ["## Fine-tuning", "", *_finetune_section(stage_dirs, previous), ""]
    comparison = _baseline_section(stage_dirs)
    if comparison:
        lines += ["## Pretrained against baselines", "", *comparison, ""]
    for note in notes:
        if note:
            lines += [note.strip(), ""]
    return "\n".join(lines)


# --- the degenerate CoLA note ----------------------------------------------------------------------------


def _all_seeds_degenerate(figures: dict, task: str) -> bool:
    seeds = figures.get(f"finetune.{task}.seeds")
    return _is_number(seeds) and seeds > 0 and figures.get(f"finetune.{task}.degenerate_seeds") == seeds


def degenerate_note(figures: dict) -> str | None:
    """Why a CoLA-like (MCC) fine-tune with every seed degenerate is expected at toy scale; None otherwise."""
    tasks = sorted(
        key.split(".")[1]
        for key, metric in figures.items()
        if key.startswith("finetune.") and key.endswith(".metric") and metric == "mcc"
    )
    degenerate = [t for t in tasks if _all_seeds_degenerate(figures, t)]
    if not degenerate:
        return None
    names = " and ".join(TASK_NAMES.get(t, t) for t in degenerate)
    layers, steps, size = (figures.get(k) for k in ("pretrain.num_layers", "pretrain.steps", "corpus.bytes"))
    model = f"a {layers}-layer model" if _is_number(layers) else "a model this small"
    trained = f"pretrained for {steps:,} steps" if _is_number(steps) else "pretrained this briefly"
    corpus = f" on {size / 1e6:.1f} MB of text" if _is_number(size) else ""
    text = (
        f"**Why {names} is degenerate here.** {names} asks whether a sentence is grammatical. "
        f"{model[0].upper()}{model[1:]} {trained}{corpus} has not learned the syntax that question turns on, "
        "so every seed predicts the majority class for every sentence. Matthews correlation is then 0 by "
        "definition (its denominator is zero), a number that says nothing about the model, so bertpipe flags "
        "such seeds as degenerate instead of scoring them."
    )
    scored = [  # the other tasks of the run with a median: they show what the same weights do learn
        (task, metric, figures.get(f"finetune.{task}.{metric}.median"))
        for key, metric in sorted(figures.items())
        if key.startswith("finetune.")
        and key.endswith(".metric")
        and (task := key.split(".")[1]) not in degenerate
    ]
    scored = [(task, metric, value) for task, metric, value in scored if _is_number(value)]
    if scored:
        task, metric, value = scored[0]
        shown = f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.3f}"
        text += (
            f" {TASK_NAMES.get(task, task)} next to it, fine-tuned from the same weights, reaches a median "
            f"{'entity ' if task == 'ner' else ''}{METRIC_NAMES.get(metric, metric)} of {shown}: that shows "
            "what this model does learn."
        )
    else:
        text += (
            " Fine-tuning a task carried by words rather than syntax beside it (SST-2 sentiment, NER) shows "
            "what the model does learn."
        )
    return text


# --- the retraining report -------------------------------------------------------------------------------


def render_retrain_markdown(summary: dict) -> str:
    """A retraining run in Markdown: what was new, UNK drift, champion vs challenger per gate check, the
    decision and why (``summary`` is what ``flows.retrain.retrain`` returns)."""
    lines = ["# bertpipe retraining run", ""]
    champion = summary.get("champion")
    lines += [
        f"Champion before this run: {'version ' + str(champion) if champion else 'none (first run)'}.",
        "",
    ]
    if summary.get("decision") == "nothing-new":
        return "\n".join([*lines, f"**Nothing new.** {summary.get('reason', '')}", ""])
    new = summary.get("new_data") or {}
    files, changed = summary.get("new_files") or [], summary.get("changed_files") or []
    lines += ["## What was new", "", "| figure | value |", "|---|---:|"]
    lines += [f"| files (new content) | {format_value(len(files), 'count')} |",
              f"| of them changed in place | {format_value(len(changed), 'count')} |",
              f"| documents | {format_value(new.get('documents'), 'count')} |",
              f"| tokens (frozen vocabulary) | {format_value(new.get('tokens'), 'count')} |"]  # fmt: skip
    mix = summary.get("mix") or {}
    if mix:
        lines.append(f"| training rows: new / old sample | {format_value(mix.get('new_rows'), 'count')} / "
                     f"{format_value(mix.get('old_rows'), 'count')} |")  # fmt: skip
    shown = files[:20]
    lines += ["", *(f"- `{_cell(f)}`{' (changed)' if f in changed else ''}" for f in shown)]
    if len(files) > len(shown):
        lines.append(f"- … and {len(files) - len(shown)} more")
    lines += ["", "## UNK drift", "", "| | UNK rate |", "|---|---:|",
              f"| new text | {format_value(new.get('unk_rate'), 'rate')} |",
              f"| champion's corpus | {format_value(new.get('champion_unk_rate'), 'rate')} |",
              f"| drift | {format_change(new.get('unk_rate'), new.get('champion_unk_rate'), 'rate')} |", ""]  # fmt: skip
    if summary.get("warning"):
        lines += [f"**Warning:** {summary['warning']}", ""]
    lines += ["## Champion vs challenger", ""]
    checks = summary.get("checks") or []
    if checks:
        lines += ["| gate metric | champion | challenger | rule | held |", "|---|---:|---:|---|---|"]
        for c in checks:
            kind = "sig4" if "loss" in c["metric"] else "score"
            lines.append(f"| {c['metric']} | {format_value(c['champion'], kind)} | "
                         f"{format_value(c['challenger'], kind)} | {_cell(c['rule'])} | "
                         f"{'yes' if c['passed'] else '**no**'} |")  # fmt: skip
    else:
        figures = summary.get("challenger_metrics") or {}
        lines += ["| metric | challenger |", "|---|---:|"]
        lines += [
            f"| {k} | {format_value(v, 'sig4' if 'loss' in k else 'score')} |" for k, v in figures.items()
        ]
    decision = summary.get("decision", "?")
    version = summary.get("version")
    lines += ["", "## Decision", "", f"**Version {version} {decision}.** {summary.get('reason', '')}", ""]
    return "\n".join(lines)
