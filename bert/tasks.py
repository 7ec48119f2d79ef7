"""Fine-tuning tasks: what each task is, how its files are read, and how examples become model inputs.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

from data_prep.manifest import verify_source

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions without a target (PyTorch's cross-entropy default)


class TaskDataError(ValueError):
    """A data file the task cannot use; the message names the file and line."""


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: its family, metrics, where its data columns are and its training defaults."""

    name: str
    kind: str
    """"classification", "regression", "tagging" (token classification) or "qa" (extractive QA)."""
    metrics: tuple[str, ...]
    """Metric names reported per seed; the first picks the best checkpoint and is the headline."""
    text_columns: tuple[str, ...] = ()
    """One (sentence) or two (sentence pair) columns: header names, or 0-based indices for files without a header."""
    label_column: str | None = None
    labels: tuple[str, ...] | None = None
    """Closed label set in model output order; None: the sorted labels seen in the training file."""
    hf_dataset: tuple[str, ...] | None = None
    """``datasets.load_dataset`` arguments for the standard data when no file is given."""
    hf_columns: tuple[tuple[str, ...], str | None] = ((), None)
    """(text columns, label column) of the standard dataset."""
    version_2: bool = False
    """SQuAD v2: questions may have no answer."""
    lr: float = 2e-5
    epochs: int = 3
    batch_size: int = 32
    max_seq_length: int = 128

    @property
    def metric(self) -> str:
        return self.metrics[0]


_GLUE = ("glue",)
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("cola", "classification", ("mcc", "accuracy"), ("3",), "1", ("0", "1"), (*_GLUE, "cola"),
             (("sentence",), "label"), max_seq_length=64),
        Task("sst2", "classification", ("accuracy",), ("sentence",), "label", ("0", "1"), (*_GLUE, "sst2"),
             (("sentence",), "label"), max_seq_length=64),
        Task("mrpc", "classification", ("f1", "accuracy"), ("#1 String", "#2 String"), "Quality", ("0", "1"),
             (*_GLUE, "mrpc"), (("sentence1", "sentence2"), "label"), epochs=5),
        Task("rte", "classification", ("accuracy",), ("sentence1", "sentence2"), "label",
             ("entailment", "not_entailment"), (*_GLUE, "rte"), (("sentence1", "sentence2"), "label"), epochs=5),
        Task("stsb", "regression", ("pearson", "spearman"), ("sentence1", "sentence2"), "score", None,
             (*_GLUE, "stsb"), (("sentence1", "sentence2"), "label"), epochs=5),
        Task("classification", "classification", ("accuracy", "macro_f1", "mcc")),
        Task("regression", "regression", ("pearson", "spearman")),
        Task("ner", "tagging", ("f1", "precision", "recall"), hf_dataset=("conll2003",),
             hf_columns=(("tokens",), "ner_tags"), lr=5e-5),
        Task("squad", "qa", ("f1", "exact_match"), hf_dataset=("squad",), lr=5e-5, epochs=2,
             batch_size=16, max_seq_length=384),
        Task("squad_v2", "qa", ("f1", "exact_match"), hf_dataset=("squad_v2",), version_2=True, lr=5e-5,
             epochs=2, batch_size=16, max_seq_length=384),
    ]
}  # fmt: skip


def get_task(name: str, text_columns: Sequence[str] | None = None, label_column: str | None = None) -> Task:
    """The named task, with its file columns overridden when given (custom files of a known task)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    task = TASKS[name]
    if text_columns:
        if task.kind in ("tagging", "qa"):
            raise ValueError(f"--text-columns does not apply to {name}: its files have a fixed format")
        if len(text_columns) not in (1, 2):
            raise ValueError(f"--text-columns takes one or two columns, got {list(text_columns)}")
        task = replace(task, text_columns=tuple(text_columns))
    if label_column:
        task = replace(task, label_column=label_column)
    if task.kind in ("classification", "regression") and (not task.text_columns or task.label_column is None):
        raise ValueError(
            f"task {name!r} reads any table: give its columns, e.g. --text-columns sentence1,sentence2 "
            f"--label-column label"
        )
    return task


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


# ------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(model_dir: str | Path) -> tokenizers.Tokenizer:
    """The model's tokenizer: tokenizer.json, else a BERT WordPiece tokenizer over vocab.txt.

    With vocab.txt, casing follows tokenizer_config.json's ``do_lower_case`` (default: lowercase unless the
    vocabulary holds upper-case pieces). Padding and truncation saved with the tokenizer are switched off.
    """
    model_dir = Path(model_dir)
    verify_source(model_dir)  # a pretrain export: its tokenizer and config as its manifest lists them
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    elif (model_dir / "vocab.txt").is_file():
        try:
            tokens = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{model_dir / 'vocab.txt'}: not UTF-8 text ({e.reason} at byte {e.start}): give a BERT vocab.txt"
            ) from None
        vocab = {t: i for i, t in enumerate(tokens) if t}
        config_path = model_dir / "tokenizer_config.json"
        lowercase = (
            json.loads(config_path.read_text(encoding="utf-8")).get("do_lower_case")
            if config_path.is_file()
            else None
        )
        if lowercase is None:
            lowercase = not any(t != t.lower() for t in vocab if not t.startswith("["))
        tokenizer = tokenizers.Tokenizer(
            models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
        )
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=bool(lowercase))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.add_special_tokens(
            [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
        )
    else:
        raise FileNotFoundError(f"{model_dir} has neither tokenizer.json nor vocab.txt")
    for special in ("[CLS]", "[SEP]"):
        if tokenizer.token_to_id(special) is None:
            raise ValueError(
                f"the tokenizer in {model_dir} has no {special} token; it is not a BERT tokenizer"
            )
    if tokenizer.post_processor is None:
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# -------------------------------------------------------------------------------------- featurisation


def encode_texts(
    tokenizer: tokenizers.Tokenizer,
    examples: list[TextExample],
    max_seq_length: int,
    labels: Sequence[str] | None,
) -> list[dict[str, Any]]:
    """``[CLS] A [SEP] (B [SEP])`` features, the longer side truncated first; label ids (or floats)."""
    label_ids = {label: i for i, label in enumerate(labels)} if labels else None
    tokenizer.enable_truncation(max_seq_length, strategy="longest_first")
    try:
        encodings = tokenizer.encode_batch([e.texts if len(e.texts) == 2 else e.texts[0] for e in examples])
    finally:
        tokenizer.no_truncation()
    return [
        {
            "input_ids": enc.ids,
            "token_type_ids": enc.type_ids,
            "labels": label_ids[e.label] if label_ids is not None else float(e.label),
        }
        for e, enc in zip(examples, encodings, strict=True)
    ]


def encode_tagged(
    tokenizer: tokenizers.Tokenizer,
    sentences: list[TaggedSentence],
    max_seq_length: int,
    labels: Sequence[str],
) -> list[dict[str, Any]]:
    """Word-level tags onto WordPieces: the first piece of a word carries its tag, the rest IGNORE_INDEX.

    ``word_index`` maps each position to its word (-1 for specials and non-first pieces), so predictions
    can be read back per word; words cut off by ``max_seq_length`` are predicted "O" at evaluation.
    """
    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer.enable_truncation(max_seq_length)
    try:
        encodings = tokenizer.encode_batch([s.words for s in sentences], is_pretokenized=True)
    finally:
        tokenizer.no_truncation()
    features = []
    for s, enc in zip(sentences, encodings, strict=True):
        targets, word_index, previous = [], [], None
        for word in enc.word_ids:
            first = word is not None and word != previous
            targets.append(label_ids[s.tags[word]] if first else IGNORE_INDEX)
            word_index.append(word if first else -1)
            previous = word
        features.append(
            {
                "input_ids": enc.ids,
                "token_type_ids": enc.type_ids,
                "labels": targets,
                "word_index": word_index,
            }
        )
    return features


def encode_squad(
    tokenizer: tokenizers.Tokenizer,
    examples: list[QAExample],
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int = 64,
) -> list[dict[str, Any]]:
    """``[CLS] question [SEP] context window [SEP]`` features over windows of the context.

    Windows start every ``doc_stride`` context tokens (Google's definition: the step, so consecutive
    windows overlap by the window length minus the stride) until one reaches the end. ``offsets`` holds the
    character span in the context of each position (None outside the context). Training targets are the
    token span of the first answer, or (0, 0) at [CLS] when the window does not contain it.
    """
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    features = []
    for example_index, ex in enumerate(examples):
        question = tokenizer.encode(ex.question, add_special_tokens=False).ids[:max_query_length]
        context = tokenizer.encode(ex.context, add_special_tokens=False)
        window_length = max_seq_length - len(question) - 3
        if window_length < 1:
            raise ValueError(
                f"max_seq_length {max_seq_length} leaves no room for the context after the question"
            )
        span = None
        if ex.answers:
            text, start_char = ex.answers[0]
            end_char = start_char + len(text)
            inside = [i for i, (s, e) in enumerate(context.offsets) if s < end_char and e > start_char]
            span = (inside[0], inside[-1]) if inside else None
        start = 0
        while True:
            length = min(window_length, len(context.ids) - start)
            prefix = len(question) + 2
            start_position = end_position = 0
            if span is not None and start <= span[0] and span[1] < start + length:
                start_position, end_position = prefix + span[0] - start, prefix + span[1] - start
            features.append(
                {
                    "input_ids": [cls_id, *question, sep_id, *context.ids[start : start + length], sep_id],
                    "token_type_ids": [0] * prefix + [1] * (length + 1),
                    "start_positions": start_position,
                    "end_positions": end_position,
                    "offsets": [None] * prefix + list(context.offsets[start : start + length]) + [None],
                    "example_index": example_index,
                }
            )
            if start + length >= len(context.ids):
                break
            start += min(length, doc_stride)
    return features
