"""Fine-tuning and evaluation: ``main(FinetuneConfig) -> metrics`` over several seeds (``bert.finetune.stage``)."""

from bert.finetune.config import FinetuneConfig
from bert.finetune.stage import main

__all__ = ["FinetuneConfig", "main"]
