"""bertpipe's BERT: the model (``bert.model``), pretraining (``bert.pretrain``), fine-tuning (``bert.finetune``).

The model's public classes are importable from here too (``from bert import BertForPreTraining``).
"""

from bert.model import (
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

__all__ = [
    "BertConfig",
    "BertModel",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
]
