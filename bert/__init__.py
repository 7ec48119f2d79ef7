"""bertpipe's BERT: the model (bert.model, bert.heads) and Hugging Face checkpoint I/O (bert.hf)."""

from bert.heads import (
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from bert.model import BertConfig, BertModel

__all__ = [
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
]
