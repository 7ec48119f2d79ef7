"""Task models on top of BertModel: pretraining (MLM + NSP), sequence and token classification, extractive QA.

Module and parameter names follow transformers (`cls.predictions.transform.dense`, `cls.seq_relationship`,
`classifier`, `qa_outputs`) so checkpoints move both ways; losses give the same values as transformers'.

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bert.model.config import ACTIVATIONS, BertConfig
from bert.model.encoder import BertModel, BertPreTrainedModel, has_fill

IGNORE_INDEX = -100  # label value for positions without a target (HF/PyTorch convention)

# ---------------------------------------------------------------------------------------- pretraining


class BertPredictionHeadTransform(nn.Module):
    """dense + activation + LayerNorm before the vocabulary projection."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Transform, then project onto the vocabulary with the word embeddings (tied) plus an output bias.

    With ``pad_vocab_to_multiple_of`` the projection has ``padded_vocab_size`` outputs (an aligned GEMM) and
    the logits are cut back to ``vocab_size``: a padding row is never predicted nor part of the softmax.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.vocab_size = config.vocab_size
        rows = config.padded_vocab_size
        self.decoder = nn.Linear(config.hidden_size, rows)  # weight tied by the owner model
        self.bias = nn.Parameter(torch.zeros(rows))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.transform(x))  # (..., H) -> (..., padded V)
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]


def find_mlm_positions(labels: torch.Tensor, multiple_of: int = 0) -> torch.Tensor:
    """(P,) flat positions b * T + t of the predicted tokens (label != -100); on a CPU batch, a host computation
    (in numpy, as ``packing_inputs``). ``multiple_of`` > 0 (host only, with the packing's fill rows: see
    ``packing_inputs``) appends fill positions B * T up to a multiple of it; their label is -100."""
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        positions = np.flatnonzero(labels.numpy().reshape(-1) != IGNORE_INDEX).astype(np.int64)
        if multiple_of:
            fill = -len(positions) % multiple_of
            positions = np.concatenate([positions, np.full(fill, labels.numel(), dtype=np.int64)])
        return torch.from_numpy(positions)
    if multiple_of:
        raise ValueError("find_mlm_positions(multiple_of=...) runs on the host: pass the CPU labels")
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


class BertPreTrainingHeads(nn.Module):
    """`cls`: the MLM head (`predictions`) and the NSP classifier (`seq_relationship`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


@dataclass
class BertForPreTrainingOutput:
    """Losses and the logits a trainer needs for mlm_acc / nsp_acc."""

    loss: torch.Tensor | None  # mlm_loss + nsp_loss (whichever labels were given)
    mlm_loss: torch.Tensor | None  # mean cross-entropy over positions with label != -100
    nsp_loss: torch.Tensor | None
    mlm_logits: torch.Tensor  # (P, V) at predicted positions when labels given, else (B, T, V)
    mlm_labels: torch.Tensor | None  # (P,) targets matching mlm_logits rows (-100 at fill positions)
    mlm_positions: torch.Tensor | None  # (P,) flat positions b * T + t of the predicted tokens
    nsp_logits: torch.Tensor  # (B, 2); class 1 = B is a random segment


class BertForPreTraining(BertPreTrainedModel):
    """BERT with the masked-LM and next-sentence heads; the vocabulary projection runs only where labels are set."""

    tied_weights = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        next_sentence_label=None,
        *,
        mlm_positions=None,
        **packing,
    ) -> BertForPreTrainingOutput:
        """labels (B, T): original ids at predicted positions, -100 elsewhere; next_sentence_label (B,) 0/1.

        Optional, computed on the host so no step waits on the device: mlm_positions (P,) the flat positions
        of labels != -100 (``find_mlm_positions(labels)``), and the packing of ``packing_inputs(attention_mask)``.
        """
        out = self.bert(input_ids, attention_mask, token_type_ids, **packing)
        hidden = out.last_hidden_state  # (B, T, H)
        mlm_loss = nsp_loss = mlm_labels = positions = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}"
                )
            flat_labels = labels.reshape(-1)
            positions = mlm_positions if mlm_positions is not None else find_mlm_positions(labels)  # (P,)
            rows = positions
            if has_fill(packing.get("cu_seqlens"), len(labels)):  # fill positions B * T: label -100, any row
                flat_labels = F.pad(flat_labels, (0, 1), value=IGNORE_INDEX)
                rows = positions.clamp(max=labels.numel() - 1)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (P, H)
            mlm_labels = flat_labels.index_select(0, positions)
        mlm_logits = self.cls.predictions(hidden)  # (P, V), or (B, T, V) without labels
        nsp_logits = self.cls.seq_relationship(out.pooler_output)  # (B, 2)
        if labels is not None:
            # transformers gives NaN for a batch with nothing to predict; 0 keeps a long run alive
            mlm_loss = F.cross_entropy(mlm_logits, mlm_labels) if len(positions) else mlm_logits.sum() * 0.0
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits, next_sentence_label.reshape(-1))
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return BertForPreTrainingOutput(
            loss, mlm_loss, nsp_loss, mlm_logits, mlm_labels, positions, nsp_logits
        )


# ------------------------------------------------------------------------------------ fine-tuning heads


@dataclass
class SequenceClassifierOutput:
    """Loss (when labels given) and logits (B, num_labels)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass
class TokenClassifierOutput:
    """Loss (when labels given) and logits (B, T, num_labels)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass
class QuestionAnsweringOutput:
    """Loss (when both positions given) and span logits (B, T) each."""

    loss: torch.Tensor | None
    start_logits: torch.Tensor
    end_logits: torch.Tensor


def _classifier_dropout(config: BertConfig) -> nn.Dropout:
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p)


class BertForSequenceClassification(BertPreTrainedModel):
    """Dropout + linear over the pooled [CLS]; MSE when num_labels == 1, cross-entropy otherwise."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, labels=None
    ) -> SequenceClassifierOutput:
        """labels (B,): class ids, or floats for regression; (B, num_labels) multi-hot for multi-label."""
        pooled = self.bert(input_ids, attention_mask, token_type_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:  # the rule transformers applies
                if self.config.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                if self.config.num_labels == 1:
                    loss = F.mse_loss(logits.reshape(-1), labels.reshape(-1).to(logits.dtype))
                else:
                    loss = F.mse_loss(logits, labels.to(logits.dtype))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits, labels.reshape(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return SequenceClassifierOutput(loss, logits)


class BertForTokenClassification(BertPreTrainedModel):
    """Dropout + linear per token (no pooler); cross-entropy ignoring label -100."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, labels=None
    ) -> TokenClassifierOutput:
        """labels (B, T): tag ids, -100 where no tag (padding, continuation word pieces)."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.classifier(self.dropout(hidden))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return TokenClassifierOutput(loss, logits)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Extractive QA: `qa_outputs` gives start and end logits per token; loss as transformers'."""

    def __init__(self, config: BertConfig):
        if config.num_labels != 2:
            raise ValueError(
                f"BertForQuestionAnswering needs num_labels=2 (start, end), got {config.num_labels}"
            )
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None, end_positions=None
    ) -> QuestionAnsweringOutput:
        """start_positions / end_positions (B,): token indices; out-of-range ones are ignored in the loss."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        start_logits, end_logits = self.qa_outputs(hidden).unbind(-1)  # each (B, T)
        loss = None
        if start_positions is not None and end_positions is not None:
            # positions beyond the input (answer truncated away) are clamped to T and ignored, as transformers does
            ignored = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, ignored)
            end = end_positions.reshape(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        return QuestionAnsweringOutput(loss, start_logits.contiguous(), end_logits.contiguous())
