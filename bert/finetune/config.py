"""The fine-tuning config: one run of one task over several seeds, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

INITS = ("pretrained", "random")


@dataclass
class FinetuneConfig:
    """One fine-tuning run; ``None`` hyperparameters take the task's default (see ``bert.finetune.tasks.TASKS``)."""

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
    init: str = "pretrained"
    """"pretrained": start from the model's weights; "random": the same architecture and tokenizer at BERT's
    random initialisation (drawn from each seed), the baseline that shows what pretraining bought."""

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
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_seq_length is not None and self.max_seq_length < 8:
            raise ValueError(f"max_seq_length {self.max_seq_length} is too short to hold [CLS] text [SEP]")
        # The model directory is checked when the run starts: a pipeline builds this config before
        # pretraining has written the model.


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
