"""The masked-LM rule, one copy for both paths: static masking in the examples stage (data_prep/examples.py)
and dynamic masking in the trainer's collator (bert/data.py).

- Budget: Google's ``min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))``, where
  ``len(tokens)`` is the whole example, [CLS] and both [SEP] included (create_pretraining_data.py), capped
  at the number of candidates. Counting the specials is what every published BERT was trained with, and
  the Google parity tests (tests/test_examples.py) pin it: a 50-token example predicts round(7.5) = 8
  tokens in both paths.
- Candidates: every token but [PAD] [UNK] [CLS] [SEP] [MASK]. Google may choose [UNK]; here it never is a
  target, since one id stands for every unknown piece and predicting it teaches nothing.
- Whole words: a word is a token and the tokens that continue it ("##" pieces; for Chinese, the characters
  of one segmenter word, see data_prep/zh_words.py); words are taken in random order while they fit in the
  budget, never split (Google's whole-word loop). Non-candidates inside a word are skipped, not the word.
- Each chosen token becomes [MASK] 80% of the time, a random non-special token 10%, stays 10%.

The functions work on a batch of examples in flat form (``ids`` and ``offsets``, the Arrow list layout):
the examples stage masks thousands at once, the collator one example per call (its rng is the example's).
"""

from __future__ import annotations

import numpy as np

NEVER_PREDICTED = ("pad", "unk", "cls", "sep", "mask")  # special token names that are never a target
COLUMN_BITS = 16  # masking keys keep the token position in their low bits (positions fit in uint16)


def never_predicted_ids(special_ids: dict[str, int]) -> np.ndarray:
    """The ids of [PAD] [UNK] [CLS] [SEP] [MASK] (those present), sorted."""
    return np.array(sorted({special_ids[n] for n in NEVER_PREDICTED if n in special_ids}), dtype=np.int64)


def num_to_predict(lengths: np.ndarray, masked_lm_prob: float, max_predictions_per_seq: int) -> np.ndarray:
    """Google's ``min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))``.

    ``lengths`` count [CLS] and both [SEP]; np.rint rounds half to even like Python's round.
    """
    wanted = np.maximum(1, np.rint(np.asarray(lengths) * masked_lm_prob).astype(np.int64))
    return np.minimum(wanted, max_predictions_per_seq)


def rows_and_positions(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(example, position within it) of every token of a flat batch (``offsets[0] == 0``)."""
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    position = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return row, position


def word_starts(
    ids: np.ndarray,
    offsets: np.ndarray,
    candidate: np.ndarray,
    is_continuation: np.ndarray | None = None,
    continues_word: np.ndarray | None = None,
) -> np.ndarray:
    """True per token where a word of whole-word masking begins.

    A token continues the word before it when it is a "##" piece (``is_continuation``, per vocabulary id)
    right after a candidate (a piece after [CLS]/[SEP], left by truncation, starts a word), or when the
    segmenter put it in the same word (``continues_word``, per token: False at and after [CLS]/[SEP]).
    """
    continues = np.zeros(len(ids), dtype=bool)
    if is_continuation is not None and len(ids) > 1:
        continues[1:] = is_continuation[ids[1:]] & candidate[:-1]
    if continues_word is not None:
        continues |= continues_word.astype(bool, copy=False)
    continues[offsets[:-1]] = False
    return ~continues


def _choose_tokens(
    row: np.ndarray, position: np.ndarray, candidate: np.ndarray, width: int, wanted: np.ndarray, rng
) -> np.ndarray:
    """A uniformly random set of ``wanted[i]`` candidates per example; True per chosen token.

    On an (examples × max length) grid every position gets a random 64-bit key with the position in its low
    bits (so keys never tie); non-candidates and padding get the largest key. The chosen positions are those
    at or below the ``wanted``-th smallest key of their row.
    """
    num_examples = len(wanted)
    column = np.arange(width, dtype=np.uint64)
    keys = rng.bit_generator.random_raw((num_examples, width))
    keys &= np.uint64(~((1 << COLUMN_BITS) - 1) & 0xFFFFFFFFFFFFFFFF)
    keys |= column
    on_grid = np.zeros((num_examples, width), dtype=bool)
    on_grid[row, position] = candidate
    keys[~on_grid] = np.iinfo(np.uint64).max
    most = int(wanted.max()) if num_examples else 0
    if most == 0:
        return np.zeros(len(row), dtype=bool)
    smallest = np.sort(np.partition(keys, most - 1, axis=1)[:, :most], axis=1)
    threshold = smallest[np.arange(num_examples), np.maximum(wanted, 1) - 1]
    chosen = (keys <= threshold[:, None]) & on_grid & (wanted > 0)[:, None]
    return chosen[row, position]


def _choose_whole_words(
    row: np.ndarray, candidate: np.ndarray, word_start: np.ndarray, wanted: np.ndarray, rng
) -> np.ndarray:
    """Whole-word selection: words in random order, each taken when it still fits under ``wanted``.

    As Google's whole-word loop: a word that would overflow the budget is skipped and smaller later words
    may still fill it, so a word is never split. A word's size is its number of candidates; words without
    any (a lone [CLS], [SEP] or [UNK]) take no part and draw no random number.
    """
    num_examples = len(wanted)
    word_of_token = np.cumsum(word_start) - 1
    size = np.bincount(word_of_token, weights=candidate)
    words = np.flatnonzero(size > 0)
    starts = np.flatnonzero(word_start)[words]
    word_row = row[starts]
    word_size = size[words].astype(np.int64)
    # Random order of the words within each example: sort by (row, random key).
    order = np.lexsort((rng.random(len(words)), word_row))
    words_per_row = np.bincount(word_row, minlength=num_examples)
    column = np.arange(len(words)) - np.repeat(np.cumsum(words_per_row) - words_per_row, words_per_row)
    width = int(words_per_row.max()) if len(words) else 0
    sizes = np.full((num_examples, max(width, 1)), np.iinfo(np.int64).max // 4, dtype=np.int64)
    sizes[word_row[order], column] = word_size[order]
    taken = np.zeros_like(sizes, dtype=bool)
    filled = np.zeros(num_examples, dtype=np.int64)
    for col in range(width):
        fits = filled + sizes[:, col] <= wanted
        taken[:, col] = fits
        filled += np.where(fits, sizes[:, col], 0)
        if (filled >= wanted).all():
            break
    word_taken = np.zeros(len(size), dtype=bool)
    word_taken[words[order]] = taken[word_row[order], column]
    return candidate & word_taken[word_of_token]


def choose_predictions(
    ids: np.ndarray,
    offsets: np.ndarray,
    candidate: np.ndarray,
    masked_lm_prob: float,
    max_predictions_per_seq: int,
    rng: np.random.Generator,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices of the tokens to predict, ascending; per example the budget) of a flat batch.

    ``candidate``: True per token that may be predicted (not [PAD] [UNK] [CLS] [SEP] [MASK]);
    ``word_start``: whole-word masking over these words (``word_starts``), None for single tokens.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    assert offsets[0] == 0 and offsets[-1] == len(ids)
    lengths = np.diff(offsets)
    row, position = rows_and_positions(offsets)
    num_candidates = np.bincount(row, weights=candidate, minlength=len(lengths)).astype(np.int64)
    wanted = np.minimum(num_to_predict(lengths, masked_lm_prob, max_predictions_per_seq), num_candidates)
    if word_start is None:
        width = int(lengths.max()) if len(lengths) else 0
        chosen = _choose_tokens(row, position, candidate, width, wanted, rng)
    else:
        chosen = _choose_whole_words(row, candidate, word_start, wanted, rng)
    return np.flatnonzero(chosen), wanted


def replace_80_10_10(
    ids: np.ndarray, selected: np.ndarray, mask_id: int, replacement_ids: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT's replacement of the chosen tokens, in place: (original ids, as [MASK], as a random token).

    80% [MASK], 10% a random id from ``replacement_ids`` (never a special token), 10% unchanged.
    """
    labels = ids[selected]  # fancy indexing copies
    draw = rng.random(len(selected))
    to_mask, to_random = draw < 0.8, draw >= 0.9
    ids[selected[to_mask]] = mask_id
    ids[selected[to_random]] = replacement_ids[rng.integers(0, len(replacement_ids), int(to_random.sum()))]
    return labels, to_mask, to_random
