"""Masked-LM loss and accuracy of a saved model on a fixed set of held-out examples, in one process.

Retraining compares a challenger with the champion on the same examples (``flows/retrain.py``), so the
figures must not depend on batch size or on which model is asked: the loss is the mean cross-entropy over
every predicted position (not a mean of batch means), the examples are the first ``max_examples`` of the
split in manifest order, and dynamic masking is seeded as the trainer seeds epoch 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bert.model.heads import BertForPreTraining
from bert.pretrain.data import Collator, open_split, vocab_dir_of
from data_prep.vocab import load_vocab


@torch.no_grad()
def evaluate_mlm(
    model_dir: str | os.PathLike,
    examples_dir: str | os.PathLike,
    split: str = "valid",
    max_examples: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float | int]:
    """``{"mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc", "examples", "predictions"}`` of the model in
    ``model_dir`` (an HF directory) on ``split`` of a finished examples directory."""
    shards = open_split(examples_dir, split)
    if shards is None:
        raise ValueError(f"{examples_dir} has no {split} examples to evaluate on")
    vocab_dir = vocab_dir_of(examples_dir, shards.metadata)
    tokens = load_vocab(vocab_dir).tokens if vocab_dir is not None else None
    collator = Collator(shards.metadata, seed, tokens=tokens)
    model = BertForPreTraining.from_pretrained(Path(model_dir)).eval()
    n = len(shards) if max_examples is None else min(max_examples, len(shards))
    mlm_loss = mlm_correct = predictions = nsp_loss = nsp_correct = 0.0
    for start in range(0, n, batch_size):
        batch = collator(shards, np.arange(start, min(n, start + batch_size)), epoch=0)
        out = model(**batch)
        rows = len(batch["input_ids"])
        if out.mlm_labels is not None and len(out.mlm_labels):
            count = len(out.mlm_labels)
            mlm_loss += float(out.mlm_loss) * count  # a mean over this batch's predictions: back to a sum
            mlm_correct += float((out.mlm_logits.argmax(-1) == out.mlm_labels).sum())
            predictions += count
        nsp_loss += float(out.nsp_loss) * rows
        nsp_correct += float((out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum())
    return {
        "mlm_loss": mlm_loss / max(1.0, predictions),
        "mlm_acc": mlm_correct / max(1.0, predictions),
        "nsp_loss": nsp_loss / max(1, n),
        "nsp_acc": nsp_correct / max(1, n),
        "examples": n,
        "predictions": int(predictions),
    }
