"""How a task's examples are read: tables, CoNLL, SQuAD JSON, or the task's standard dataset.

Three families: sentence (pair) classification and regression from TSV/CSV/JSONL (GLUE and any file
with named columns), token classification from CoNLL files (IOB2), and extractive QA from SQuAD JSON
(v1.1 and v2.0). Without a file, a task's standard dataset is fetched with ``datasets.load_dataset``;
a directory written by ``Dataset.save_to_disk`` is read with ``datasets.load_from_disk``.
Every reader error names the file and line.

"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert.finetune.tasks import Task, TaskDataError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ examples


@dataclass
class TextExample:
    """One sentence or sentence pair with its label (a label name, or a float for regression)."""

    texts: tuple[str, ...]
    label: str | float
    where: str = ""


@dataclass
class TaggedSentence:
    """One sentence of words with one tag each."""

    words: list[str]
    tags: list[str]
    where: str = ""


@dataclass
class QAExample:
    """One SQuAD question; ``answers`` is empty for an unanswerable (v2) question."""

    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)  # (text, character start)
    where: str = ""


# ------------------------------------------------------------------------------------------- readers


def _table_rows(path: Path, columns: list[str]):
    """(line number, {column: value}) of a TSV/CSV/JSONL file; numeric columns mean no header row."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
                missing = [c for c in columns if c not in record]
                if missing:
                    raise TaskDataError(
                        f"{path}:{lineno}: no field {missing[0]!r}; fields are {sorted(record)}"
                    )
                yield lineno, {c: record[c] for c in columns}
        return
    indexed = all(c.isdigit() for c in columns)
    with open(path, encoding="utf-8-sig", newline="") as f:
        if suffix == ".csv":
            lines = csv.reader(f)
        else:  # TSV: split on tabs only; GLUE sentences hold unbalanced quotes
            lines = (line.rstrip("\r\n").split("\t") for line in f)
        index: dict[str, int]
        if indexed:
            index = {c: int(c) for c in columns}
        else:
            header = next(lines, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            missing = [c for c in columns if c not in header]
            if missing:
                raise TaskDataError(
                    f"{path}:1: no column {missing[0]!r} in the header; columns are {header} "
                    f"(files without a header take 0-based column numbers)"
                )
            index = {c: header.index(c) for c in columns}
        first = 1 if indexed else 2
        for lineno, fields in enumerate(lines, first):
            if not any(x.strip() for x in fields):
                continue
            width = max(index.values()) + 1
            if len(fields) < width:
                raise TaskDataError(
                    f"{path}:{lineno}: {len(fields)} fields, but column {max(index, key=index.get)!r} "
                    f"needs {width}"
                )
            yield lineno, {c: fields[i] for c, i in index.items()}


def read_table(path: str | Path, task: Task, labels: Sequence[str] | None = None) -> list[TextExample]:
    """Sentence (pair) examples of a TSV, CSV or JSONL file; labels outside ``labels`` are errors."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    allowed = set(labels or task.labels or ()) or None
    examples = []
    for lineno, row in _table_rows(path, [*task.text_columns, task.label_column]):
        raw = row[task.label_column]
        label: str | float
        if task.kind == "regression":
            try:
                label = float(raw)
            except (TypeError, ValueError):
                raise TaskDataError(f"{path}:{lineno}: label {raw!r} is not a number") from None
        else:
            label = str(raw).strip()
            if allowed is not None and label not in allowed:
                raise TaskDataError(
                    f"{path}:{lineno}: label {label!r} is not one of the task's labels {sorted(allowed)}"
                )
        texts = tuple("" if row[c] is None else str(row[c]) for c in task.text_columns)
        examples.append(TextExample(texts, label, f"{path}:{lineno}"))
    if not examples:
        raise TaskDataError(f"{path}: no examples (the file is empty or holds only a header)")
    return examples


def read_conll(path: str | Path, labels: Sequence[str] | None = None) -> list[TaggedSentence]:
    """Sentences of a CoNLL file: one token per line (token first, tag last), blank lines between sentences."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    allowed = set(labels) if labels else None
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    num_fields = None
    start = 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate([*f, ""], 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sentences.append(TaggedSentence(words, tags, f"{path}:{start}"))
                    words, tags = [], []
                continue
            num_fields = num_fields or len(fields)
            if len(fields) != num_fields or num_fields < 2:
                raise TaskDataError(
                    f"{path}:{lineno}: {len(fields)} fields where the file has {num_fields} "
                    f"(token ... tag, separated by whitespace)"
                )
            tag = fields[-1]
            if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                raise TaskDataError(f"{path}:{lineno}: tag {tag!r} is not IOB2 (O, B-TYPE or I-TYPE)")
            if allowed is not None and tag not in allowed:
                raise TaskDataError(
                    f"{path}:{lineno}: tag {tag!r} is not among the training tags {sorted(allowed)}"
                )
            if not words:
                start = lineno
            words.append(fields[0])
            tags.append(tag)
    if not sentences:
        raise TaskDataError(f"{path}: no sentences (the file is empty)")
    return sentences


def tag_order(tags: set[str]) -> list[str]:
    """Tags in model output order: O first, then B-/I- per entity type, types sorted."""
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def _first_lines(raw: str, needles: set[str]) -> dict[str, int]:
    """Line of each quoted needle's first occurrence in ``raw`` (0 where absent), in a pass or two over it.

    What ``raw.find`` per needle would give, without searching the whole text once per question: a needle
    ``"..."`` holding k quotes inside can only occur spanning k + 1 consecutive gaps between the quotes of
    ``raw``, so one walk over the quote positions per k (in practice only k = 0) finds every first occurrence.
    """
    quotes = [m.start() for m in re.finditer('"', raw)]
    first: dict[str, int] = {}
    by_gaps: dict[int, set[str]] = {}
    for needle in needles:
        by_gaps.setdefault(needle.count('"') - 1, set()).add(needle)
    for gaps, group in by_gaps.items():
        lengths = {len(needle) for needle in group}
        left = len(group)
        for start, end in zip(quotes, quotes[gaps:], strict=False):
            if end - start + 1 in lengths:
                span = raw[start : end + 1]
                if span in group and span not in first:
                    first[span] = start
                    left -= 1
                    if not left:
                        break
    lines = dict.fromkeys(needles, 0)
    line, at = 1, 0
    for start, needle in sorted((start, needle) for needle, start in first.items()):
        line += raw.count("\n", at, start)  # counting between successive hits: one pass in all
        lines[needle], at = line, start
    return lines


def _question_ids(data: Any) -> set[str]:
    """Quoted ids of the questions ``read_squad`` reads; a malformed entry ends the list (and the read)."""
    ids = set()
    try:
        for article in data:
            for paragraph in article.get("paragraphs", []):
                for qa in paragraph.get("qas", []):
                    ids.add(json.dumps(str(qa.get("id"))))
    except (AttributeError, TypeError):
        pass
    return ids


def read_squad(path: str | Path, version_2: bool) -> list[QAExample]:
    """Questions of a SQuAD v1.1/v2.0 JSON file; answers are checked against their context offsets."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    raw = path.read_text(encoding="utf-8-sig")
    if not raw.strip():
        raise TaskDataError(f"{path}: the file is empty")
    try:
        data = json.loads(raw)["data"]
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (KeyError, TypeError):
        raise TaskDataError(f"{path}: not SQuAD JSON (no top-level 'data' list)") from None
    # A question's line is that of the first occurrence of its quoted id, found for all ids at once.
    lines = _first_lines(raw, _question_ids(data))
    examples = []
    for article in data:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id"))
                where = f"{path}:{lines[json.dumps(qid)]}"
                answers = []
                for answer in qa.get("answers", []):
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise TaskDataError(
                            f"{where}: question {qid}: an answer lacks 'text' or 'answer_start'"
                        )
                    if context[start : start + len(text)] != text:
                        raise TaskDataError(
                            f"{where}: question {qid}: answer {text!r} is not at offset {start} of its "
                            f"context (found {context[start : start + len(text)]!r})"
                        )
                    answers.append((text, start))
                impossible = bool(qa.get("is_impossible", False))
                if impossible and not version_2:
                    raise TaskDataError(f"{where}: question {qid} is unanswerable; use --task squad_v2")
                if not answers and not impossible:
                    raise TaskDataError(
                        f"{where}: question {qid} has no answers and is not marked is_impossible"
                    )
                examples.append(QAExample(qid, qa["question"], context, [] if impossible else answers, where))
    if not examples:
        raise TaskDataError(f"{path}: no questions")
    return examples


# ----------------------------------------------------------------------- the standard (HF) datasets


def _hf_split(task: Task, source: str | None, split: str):
    """A ``datasets.Dataset``: from a ``save_to_disk`` directory, else the task's standard dataset."""
    import datasets  # heavy; only this path needs it

    if source is not None:
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise TaskDataError(f"{source}: no split {split!r}; it holds {list(loaded)}")
            loaded = loaded[split]
        return loaded
    if task.hf_dataset is None:
        raise ValueError(f"task {task.name!r} has no standard dataset: give --train and --eval files")
    log.info("loading %s split %s with datasets.load_dataset", "/".join(task.hf_dataset), split)
    return datasets.load_dataset(*task.hf_dataset, split=split)


def _class_names(dataset, column: str) -> list[str] | None:
    feature = dataset.features.get(column) if dataset.features else None
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for tags
    return list(getattr(feature, "names", None) or []) or None


def _from_hf(task: Task, dataset, where: str) -> list:
    if task.kind == "qa":
        return [
            QAExample(r["id"], r["question"], r["context"],
                      list(zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)), f"{where}[{i}]")
            for i, r in enumerate(dataset)
        ]  # fmt: skip
    text_columns, label_column = task.hf_columns
    if task.kind == "tagging":
        names = _class_names(dataset, label_column)
        return [
            TaggedSentence(
                list(r["tokens"]), [names[t] if names else str(t) for t in r[label_column]], f"{where}[{i}]"
            )
            for i, r in enumerate(dataset)
        ]
    examples = []
    for i, r in enumerate(dataset):
        label = r[label_column]
        if task.kind == "regression":
            label = float(label)
        elif isinstance(label, int) and task.labels is not None:
            if not 0 <= label < len(task.labels):
                raise TaskDataError(
                    f"{where}[{i}]: label {label} is not one of the task's labels (test split?)"
                )
            label = task.labels[label]
        examples.append(TextExample(tuple(r[c] for c in text_columns), str(label) if task.kind != "regression"
                                    else label, f"{where}[{i}]"))  # fmt: skip
    if not examples:
        raise TaskDataError(f"{where}: no examples")
    return examples


_FORMATS = {"qa": "SQuAD JSON", "tagging": "CoNLL"}  # any other kind: a table


def load_examples(
    task: Task, source: str | Path | None, split: str, labels: Sequence[str] | None = None
) -> list:
    """The examples of one split: a local file, a ``save_to_disk`` directory, or (None) the standard dataset."""
    if source is not None and Path(source).is_dir():
        return _from_hf(task, _hf_split(task, str(source), split), str(source))
    if source is None:
        name = "/".join(task.hf_dataset or ())
        return _from_hf(task, _hf_split(task, None, split), f"{name}:{split}")
    try:
        if task.kind == "qa":
            return read_squad(source, task.version_2)
        if task.kind == "tagging":
            return read_conll(source, labels)
        return read_table(source, task, labels)
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        raise TaskDataError(
            f"{source}: not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded): give the "
            f"{split} data as a UTF-8 {_FORMATS.get(task.kind, 'TSV, CSV or JSONL')} file"
        ) from None


def label_list(task: Task, train_examples: list) -> list[str] | None:
    """The model's output labels: the task's closed set, or those seen in training (None for regression/QA)."""
    if task.kind in ("regression", "qa"):
        return None
    if task.kind == "tagging":
        return tag_order({t for s in train_examples for t in s.tags})
    if task.labels is not None:
        return list(task.labels)
    return sorted({e.label for e in train_examples})


def check_labels(examples: list, labels: Sequence[str] | None) -> None:
    """Raise on an evaluation label the model cannot output (names the file and line)."""
    if labels is None:
        return
    allowed = set(labels)
    for e in examples:
        for label in e.tags if isinstance(e, TaggedSentence) else [e.label]:
            if label not in allowed:
                raise TaskDataError(
                    f"{e.where}: label {label!r} is not among the training labels {sorted(allowed)}"
                )
