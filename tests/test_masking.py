"""One masking rule (data_prep/masking.py) for static masking (the examples stage) and dynamic masking
(the trainer's collator): the same budget, never [CLS] [SEP] [PAD] [UNK] [MASK]."""

from __future__ import annotations

import numpy as np
import pytest

from bert.pretrain.data import Collator, dynamic_mask
from data_prep import examples as ex
from data_prep.masking import never_predicted_ids, num_to_predict
from data_prep.schema import ExampleMetadata, continuation_table, replacement_ids

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = {"pad": PAD, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK}
NEVER = [PAD, UNK, CLS, SEP, MASK]
TOKENS = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [f"w{i}" for i in range(5, 80)]
    + [f"##p{i}" for i in range(80, 100)]
)
MAX_PREDICTIONS = 12  # below round(0.15 * length) of the longest examples: the cap applies


def random_examples(num_examples: int, seed: int) -> ex.ExampleArrays:
    """``[CLS] A [SEP] B [SEP]`` of random words, "##" pieces and stray [UNK], [PAD] and [MASK] ids."""
    rng = np.random.default_rng(seed)
    rows, len_a = [], []
    for _ in range(num_examples):
        a, b = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        body = rng.integers(5, 100, a + b)
        body[rng.random(a + b) < 0.08] = UNK  # unknown words: many in a real Chinese corpus
        body[rng.random(a + b) < 0.01] = PAD  # literal special tokens in the text
        body[rng.random(a + b) < 0.01] = MASK
        rows.append(np.concatenate([[CLS], body[:a], [SEP], body[a:], [SEP]]))
        len_a.append(a)
    rows.append(np.array([CLS] + [UNK] * 20 + [7, 8] + [SEP] + [UNK] * 10 + [SEP]))  # 2 candidates only
    len_a.append(22)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    ids = np.concatenate(rows).astype(np.uint16)
    return ex.ExampleArrays(
        input_ids=ids,
        token_type_ids=np.zeros(len(ids), dtype=np.uint8),
        offsets=offsets,
        len_a=np.array(len_a),
        next_sentence_label=np.zeros(len(rows), dtype=np.int8),
        a_doc_id=np.zeros(len(rows), dtype=np.int64),
        b_doc_id=np.zeros(len(rows), dtype=np.int64),
        truncated=np.zeros(len(rows), dtype=bool),
    )


def static_predictions(examples: ex.ExampleArrays, whole_word: bool) -> list[np.ndarray]:
    """The positions static masking chooses, per example."""
    ex.mask_examples(
        examples,
        0.15,
        MAX_PREDICTIONS,
        MASK,
        replacement_ids(TOKENS, SPECIAL),
        np.random.default_rng(1),
        continuation_table(TOKENS) if whole_word else None,
        never_predicted_ids(SPECIAL),
    )
    bounds = examples.masked_lm_offsets
    return [examples.masked_lm_positions[bounds[i] : bounds[i + 1]] for i in range(examples.num_examples)]


def dynamic_predictions(original: ex.ExampleArrays, whole_word: bool) -> list[np.ndarray]:
    """The positions the trainer's collator chooses, per example (its own rng per example)."""
    metadata = ExampleMetadata(
        vocab_fingerprint="test",
        vocab_size=len(TOKENS),
        special_ids=SPECIAL,
        max_seq_length=128,
        masking="dynamic",
        masked_lm_prob=0.15,
        max_predictions_per_seq=MAX_PREDICTIONS,
        whole_word_mask=whole_word,
        seed=0,
    )
    collator = Collator(metadata, seed=5, pad_to_multiple_of=1, tokens=TOKENS)
    dataset = [
        {
            "input_ids": original.input_ids[original.offsets[i] : original.offsets[i + 1]],
            "token_type_ids": original.token_type_ids[original.offsets[i] : original.offsets[i + 1]],
            "next_sentence_label": 0,
        }
        for i in range(original.num_examples)
    ]
    labels = collator(dataset, np.arange(len(dataset)), epoch=0)["labels"].numpy()
    return [np.flatnonzero(labels[i] != -100) for i in range(len(dataset))]


@pytest.mark.parametrize("whole_word", [False, True])
def test_static_and_dynamic_masking_follow_one_rule(whole_word):
    examples = random_examples(300, seed=whole_word)
    ids = examples.input_ids.copy()
    lengths = examples.lengths
    candidates = np.array(
        [
            (~np.isin(ids[s:e], NEVER)).sum()
            for s, e in zip(examples.offsets[:-1], examples.offsets[1:], strict=True)
        ]
    )
    # Google's budget counts [CLS] and [SEP]; capped at what may be predicted.
    budget = np.minimum(num_to_predict(lengths, 0.15, MAX_PREDICTIONS), candidates)
    dynamic = dynamic_predictions(examples, whole_word)
    static = static_predictions(examples, whole_word)
    assert budget[-1] == 2 and (budget == MAX_PREDICTIONS).any()
    for i, (s, d) in enumerate(zip(static, dynamic, strict=True)):
        row = ids[examples.offsets[i] : examples.offsets[i + 1]]
        for chosen in (s, d):
            assert not np.isin(row[chosen], NEVER).any()  # never [CLS] [SEP] [PAD] [UNK] [MASK]
            assert len(chosen) <= budget[i]
        if not whole_word:
            assert len(s) == len(d) == budget[i]
    if whole_word:  # a word that would overflow is skipped: mostly, but not always, the full budget
        hits = [len(s) == b for s, b in zip(static, budget, strict=True)]
        assert np.mean(hits) > 0.5
        hits = [len(d) == b for d, b in zip(dynamic, budget, strict=True)]
        assert np.mean(hits) > 0.5


def test_a_50_token_example_gets_8_predictions_both_ways():
    row = np.concatenate([[CLS], np.arange(5, 29), [SEP], np.arange(30, 53), [SEP]])
    assert len(row) == 50
    examples = ex.ExampleArrays(
        input_ids=row.astype(np.uint16),
        token_type_ids=np.zeros(50, dtype=np.uint8),
        offsets=np.array([0, 50]),
        len_a=np.array([24]),
        next_sentence_label=np.zeros(1, dtype=np.int8),
        a_doc_id=np.zeros(1, dtype=np.int64),
        b_doc_id=np.zeros(1, dtype=np.int64),
        truncated=np.zeros(1, dtype=bool),
    )
    dynamic = dynamic_predictions(examples, whole_word=False)
    static = static_predictions(examples, whole_word=False)
    assert len(static[0]) == len(dynamic[0]) == 8  # round(50 * 0.15) = round(7.5) = 8


def test_dynamic_mask_honours_given_word_starts():
    ids = np.array([CLS, 10, 11, 12, 13, 14, 15, SEP, 16, 17, SEP])
    word_start = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1], dtype=np.uint8)  # words 10-12, 13-14, 16-17
    for seed in range(40):
        _, positions, _ = dynamic_mask(
            ids,
            np.random.default_rng(seed),
            np.array(NEVER),
            np.arange(5, 80),
            MASK,
            0.4,
            4,
            None,
            word_start,
        )
        chosen = set(positions.tolist())
        for word in ({1, 2, 3}, {4, 5}, {8, 9}):
            assert word <= chosen or not word & chosen
        assert 0 < len(chosen) <= 4
