"""The column contract between the data stages and the trainer (``bert/data.py`` imports this module).

Corpus shards (Parquet): ``doc_id`` int64, ``source`` string, ``sentences`` list<string>.

Example shards (Arrow IPC files, one row per example, not padded):

| column | type | meaning |
|---|---|---|
| input_ids | list<uint16> (int32 when the vocab exceeds 65,536) | ``[CLS] A [SEP] B [SEP]``; already masked in static mode |
| token_type_ids | list<uint8> | 0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]`` |
| next_sentence_label | int8 | 0: B follows A; 1: B is a random segment (HF/BERT convention) |
| masked_lm_positions | list<uint16> | static mode: positions chosen for prediction, ascending; empty in dynamic mode |
| masked_lm_ids | list<uint16/int32> | static mode: the original ids at those positions; empty in dynamic mode |
| a_doc_id, b_doc_id | int64 | lineage: the corpus documents A and B came from |
| word_start | list<uint8> | dynamic whole-word masking only: 1 where a word of whole-word masking begins |

``word_start`` carries the word boundaries static masking would use ("##" pieces and, for Chinese, the
segmenter's words, data_prep/zh_words.py), so the trainer's dynamic masking groups tokens the same way.

The schema's key/value metadata holds one key, ``bertpipe``, whose value is the JSON of ExampleMetadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
METADATA_KEY = b"bertpipe"
WORD_START_COLUMN = "word_start"

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_ID_NAMES = {"[PAD]": "pad", "[UNK]": "unk", "[CLS]": "cls", "[SEP]": "sep", "[MASK]": "mask"}

CORPUS_SCHEMA = pa.schema(
    [("doc_id", pa.int64()), ("source", pa.string()), ("sentences", pa.list_(pa.string()))]
)

UINT16_VOCAB_LIMIT = 65536


def token_id_type(vocab_size: int) -> pa.DataType:
    """uint16 ids when they fit (half the bytes of int32), int32 beyond."""
    return pa.uint16() if vocab_size <= UINT16_VOCAB_LIMIT else pa.int32()


def special_ids_of(tokens: list[str]) -> dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} -> id, for the special tokens present in ``tokens``."""
    index = {token: i for i, token in enumerate(tokens)}
    return {name: index[token] for token, name in SPECIAL_ID_NAMES.items() if token in index}


def replacement_ids(tokens: list[str], special_ids: dict[str, int]) -> np.ndarray:
    """Ids a random MLM replacement may take: all but special tokens and reserved ``[...]`` tokens.

    Static masking (data_prep) and dynamic masking (the trainer's collator) both draw from this set.
    """
    excluded = set(special_ids.values())
    keep = [
        i
        for i, t in enumerate(tokens)
        if i not in excluded and not (len(t) > 2 and t.startswith("[") and t.endswith("]"))
    ]
    return np.array(keep, dtype=np.int64)


def continuation_table(tokens: list[str]) -> np.ndarray:
    """True for WordPiece continuations ("##..."), which whole-word masking keeps with their word."""
    return np.array([t.startswith("##") and len(t) > 2 for t in tokens], dtype=bool)


def vocab_fingerprint(tokens: list[str]) -> str:
    """sha256 of the vocabulary in id order: two tokenizers with equal fingerprints map text to equal ids."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ExampleMetadata:
    """What a trainer must agree with before it reads a shard of examples."""

    vocab_fingerprint: str
    vocab_size: int
    special_ids: dict[str, int]  # {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    max_seq_length: int
    masking: str  # "static" (masked in the shard) or "dynamic" (the collator masks)
    masked_lm_prob: float
    max_predictions_per_seq: int
    whole_word_mask: bool
    seed: int
    lowercase: bool | None = None
    # Whole-word masking of Chinese: the word segmenter and its version ("jieba 0.42.1"); None when words
    # are "##" pieces only
    word_segmenter: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_arrow(self) -> dict[bytes, bytes]:
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True).encode()}

    @classmethod
    def from_arrow(cls, schema: pa.Schema, where: str = "shard") -> ExampleMetadata:
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{where} has no bertpipe metadata: it was not written by `bertpipe examples`")
        values = json.loads(raw)
        if values.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{where} has format_version {values.get('format_version')}, this bertpipe reads "
                f"{FORMAT_VERSION}: regenerate the examples with this version"
            )
        return cls(**values)

    def compatible(self, other: ExampleMetadata) -> bool:
        """Whether shards of these two metadata can be trained on together: everything a trainer reads agrees.

        ``seed`` and ``extra`` are provenance (which corpus, how segments were drawn), so the parts of several
        examples runs of one vocabulary and masking setup (continued pretraining on new data) mix.
        """
        mine, theirs = asdict(self), asdict(other)
        for key in ("seed", "extra"):
            mine.pop(key)
            theirs.pop(key)
        return mine == theirs

    def mismatches(
        self,
        vocab_size: int,
        special_ids: dict[str, int] | None = None,
        max_position_embeddings: int | None = None,
        vocab_fingerprint: str | None = None,
    ) -> list[str]:
        """Every way these examples disagree with a model/tokenizer; empty when they agree."""
        problems = []
        if vocab_fingerprint is not None and vocab_fingerprint != self.vocab_fingerprint:
            problems.append(
                f"vocabulary fingerprint {self.vocab_fingerprint[:12]}… of the examples differs from the "
                f"tokenizer's {vocab_fingerprint[:12]}… (the examples were made with another vocab.txt)"
            )
        if self.vocab_size > vocab_size:
            problems.append(f"examples use a vocabulary of {self.vocab_size} ids, the model has {vocab_size}")
        if special_ids is not None:
            for name, token_id in self.special_ids.items():
                if name in special_ids and special_ids[name] != token_id:
                    problems.append(
                        f"[{name.upper()}] is id {token_id} in the examples, {special_ids[name]} in the model"
                    )
        if max_position_embeddings is not None and self.max_seq_length > max_position_embeddings:
            problems.append(
                f"examples are up to {self.max_seq_length} tokens, the model has only "
                f"{max_position_embeddings} positions"
            )
        return problems


def has_word_starts(metadata: ExampleMetadata) -> bool:
    """Whether the shards carry the ``word_start`` column: dynamic whole-word masking (static masking has
    used the word boundaries already)."""
    return metadata.masking == "dynamic" and metadata.whole_word_mask


def example_schema(metadata: ExampleMetadata) -> pa.Schema:
    """The Arrow schema of example shards for a vocabulary of ``metadata.vocab_size`` ids."""
    ids = token_id_type(metadata.vocab_size)
    fields = [
        ("input_ids", pa.list_(ids)),
        ("token_type_ids", pa.list_(pa.uint8())),
        ("next_sentence_label", pa.int8()),
        ("masked_lm_positions", pa.list_(pa.uint16())),
        ("masked_lm_ids", pa.list_(ids)),
        ("a_doc_id", pa.int64()),
        ("b_doc_id", pa.int64()),
    ]
    if has_word_starts(metadata):
        fields.append((WORD_START_COLUMN, pa.list_(pa.uint8())))
    return pa.schema(fields, metadata=metadata.to_arrow())
