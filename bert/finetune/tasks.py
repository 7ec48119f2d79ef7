"""The task registry: what each fine-tuning task is (family, metrics, columns, training defaults)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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
