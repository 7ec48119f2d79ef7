"""How examples become model inputs: the tokenizer of a model directory, encoding, padding into batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch

from bert.finetune.readers import QAExample, TaggedSentence, TextExample
from bert.finetune.tasks import IGNORE_INDEX
from data_prep.vocab import add_bert_post_processor, load_vocab

# ------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(model_dir: str | Path) -> tokenizers.Tokenizer:
    """The model's tokenizer, as ``data_prep.vocab.load_vocab`` loads it (tokenizer.json, else vocab.txt
    cased as tokenizer_config.json says; no padding or truncation), with BERT's ``[CLS] A [SEP] B [SEP]``
    template added when tokenizer.json has none."""
    tokenizer = load_vocab(model_dir).tokenizer  # checks the files against a pretrain export's manifest
    if tokenizer.post_processor is None:
        add_bert_post_processor(tokenizer)
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
            labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
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
