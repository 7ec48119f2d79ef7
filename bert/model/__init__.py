"""BERT in plain PyTorch: config, encoder, task heads, Hugging Face checkpoint I/O."""

from bert.model.config import BertConfig
from bert.model.encoder import BertModel, BertModelOutput, BertPreTrainedModel
from bert.model.heads import (
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)

__all__ = [
    "BertConfig",
    "BertModel",
    "BertModelOutput",
    "BertPreTrainedModel",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
]
