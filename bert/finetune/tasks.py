"""The task registry: what each fine-tuning task is (family, metrics, columns, training defaults)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

IGNORE_INDEX = -100  # label of positions without a target (PyTorch's cross-entropy default)


class TaskDataError(ValueError):
    """A data file the task cannot use; the message names the file and line."""


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True, kw_only=True)
class Task:
    """A fine-tuning task: its family, metrics, where its data columns are and its training defaults.

    Built by keyword only (``Task(name=..., kind=..., metrics=...)``): most fields are tuples of strings
    that a positional call would let slip into each other's place."""

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
        Task(name="cola", kind="classification", metrics=("mcc", "accuracy"), text_columns=("3",),
             label_column="1", labels=("0", "1"), hf_dataset=(*_GLUE, "cola"),
             hf_columns=(("sentence",), "label"), max_seq_length=64),
        Task(name="sst2", kind="classification", metrics=("accuracy",), text_columns=("sentence",),
             label_column="label", labels=("0", "1"), hf_dataset=(*_GLUE, "sst2"),
             hf_columns=(("sentence",), "label"), max_seq_length=64),
        Task(name="mrpc", kind="classification", metrics=("f1", "accuracy"),
             text_columns=("#1 String", "#2 String"), label_column="Quality", labels=("0", "1"),
             hf_dataset=(*_GLUE, "mrpc"), hf_columns=(("sentence1", "sentence2"), "label"), epochs=5),
        Task(name="rte", kind="classification", metrics=("accuracy",), text_columns=("sentence1", "sentence2"),
             label_column="label", labels=("entailment", "not_entailment"), hf_dataset=(*_GLUE, "rte"),
             hf_columns=(("sentence1", "sentence2"), "label"), epochs=5),
        Task(name="stsb", kind="regression", metrics=("pearson", "spearman"),
             text_columns=("sentence1", "sentence2"), label_column="score", labels=None,
             hf_dataset=(*_GLUE, "stsb"), hf_columns=(("sentence1", "sentence2"), "label"), epochs=5),
        Task(name="classification", kind="classification", metrics=("accuracy", "macro_f1", "mcc")),
        Task(name="regression", kind="regression", metrics=("pearson", "spearman")),
        Task(name="ner", kind="tagging", metrics=("f1", "precision", "recall"), hf_dataset=("conll2003",),
             hf_columns=(("tokens",), "ner_tags"), lr=5e-5),
        Task(name="squad", kind="qa", metrics=("f1", "exact_match"), hf_dataset=("squad",), lr=5e-5, epochs=2,
             batch_size=16, max_seq_length=384),
        Task(name="squad_v2", kind="qa", metrics=("f1", "exact_match"), hf_dataset=("squad_v2",),
             version_2=True, lr=5e-5, epochs=2, batch_size=16, max_seq_length=384),
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
