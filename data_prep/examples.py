"""MLM/NSP examples from tokenised documents: Google's create_pretraining_data.py algorithm, vectorised.

Pure functions; every random draw comes from an ``rng`` passed in. The only per-item Python loop is the
sequential walk over a document's chunks (``segment_document``), one iteration per example, working on
sentence offsets. Everything per token (truncation, ``[CLS] A [SEP] B [SEP]`` assembly, token types,
masking) works on flat numpy arrays of a whole batch of examples at once.

Spans refer to token positions in two flat id arrays: the current block of documents (A, and B of
positive pairs) and the negative pool (B of random pairs), see DocumentBlock.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

MIN_MAX_SEQ_LENGTH = 8  # [CLS] A [SEP] B [SEP] with a target of at least 2 tokens and room to truncate
COLUMN_BITS = 16  # masking keys keep the token position in their low bits (positions fit in uint16)


@dataclass
class DocumentBlock:
    """Tokenised documents in flat form: ``ids[sent_offsets[s]:sent_offsets[s + 1]]`` is sentence ``s``.

    Document ``d`` owns the sentences ``doc_bounds[d] .. doc_bounds[d + 1] - 2``: ``sent_offsets`` holds each
    document's ``num_sentences + 1`` boundaries, so a document's end boundary is not shared with the next.
    """

    ids: np.ndarray  # (num_tokens,) uint16 or int32
    sent_offsets: list[int]  # global token offsets, per document num_sentences + 1 entries
    doc_bounds: list[int]  # (num_docs + 1,) index into sent_offsets
    doc_ids: list[int]

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)


@dataclass
class SpanLists:
    """Examples before assembly: where A and B come from, as parallel Python lists (cheap to append)."""

    a_start: list[int] = field(default_factory=list)  # offset into the block's ids
    a_len: list[int] = field(default_factory=list)
    b_start: list[int] = field(default_factory=list)  # offset into the block's ids, or the pool's when random
    b_len: list[int] = field(default_factory=list)
    is_random_next: list[int] = field(default_factory=list)
    a_doc_id: list[int] = field(default_factory=list)
    b_doc_id: list[int] = field(default_factory=list)
    short_target: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.a_start)

    def take(self, count: int) -> dict[str, np.ndarray]:
        """Remove the first ``count`` examples and return them as int64 numpy arrays."""
        taken = {}
        for name, values in vars(self).items():
            taken[name] = np.array(values[:count], dtype=np.int64)
            del values[:count]
        return taken


def draw_int(rng: random.Random, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both inclusive, like ``randint``) at a fraction of its cost."""
    return low + int(rng.random() * (high - low + 1))


def segment_document(
    block: DocumentBlock,
    doc: int,
    pool: DocumentBlock,
    max_num_tokens: int,
    short_seq_prob: float,
    rng: random.Random,
    out: SpanLists,
) -> None:
    """Append the examples of one document (one dupe round) to ``out``, as create_instances_from_document.

    Sentences accumulate into a chunk until it reaches the target length (or the document ends); A is the
    first ``a_end`` sentences of the chunk; B is the rest of the chunk, or with probability 1/2 (always,
    when the chunk has one sentence) a random span of another document, in which case the chunk's unused
    sentences are put back. Deviation: the target length is drawn per chunk rather than once per document,
    so that short_seq_prob is the share of short *sequences* whatever the document lengths.
    """
    cum = block.sent_offsets
    first, end = block.doc_bounds[doc], block.doc_bounds[doc + 1] - 1  # sentences first .. end - 1
    doc_id = block.doc_ids[doc]
    pool_cum, pool_bounds, pool_ids = pool.sent_offsets, pool.doc_bounds, pool.doc_ids
    num_pool_docs = len(pool_ids)
    rand = rng.random  # draw_int inlined below: this loop runs once per example
    a_start, a_lens, a_doc = out.a_start.append, out.a_len.append, out.a_doc_id.append
    b_start, b_lens, b_doc = out.b_start.append, out.b_len.append, out.b_doc_id.append
    random_next, short_target = out.is_random_next.append, out.short_target.append
    i = first
    while i < end:
        target = max_num_tokens
        short = rand() < short_seq_prob
        if short:
            target = 2 + int(rand() * (max_num_tokens - 1))  # uniform in [2, max_num_tokens]
        # First sentence boundary k with cum[k] - cum[i] >= target: the chunk is sentences i .. k - 1.
        chunk_end = bisect_left(cum, cum[i] + target, i + 1, end + 1)
        if chunk_end > end:
            chunk_end = end
        num_segments = chunk_end - i
        a_end = i + (1 if num_segments == 1 else 1 + int(rand() * (num_segments - 1)))
        a_len = cum[a_end] - cum[i]
        a_start(cum[i])
        a_lens(a_len)
        a_doc(doc_id)
        short_target(short)
        if num_segments == 1 or rand() < 0.5:
            # Google tries ten times for a document other than this one.
            other = int(rand() * num_pool_docs)
            for _ in range(9):
                if pool_ids[other] != doc_id:
                    break
                other = int(rand() * num_pool_docs)
            p_first, p_end = pool_bounds[other], pool_bounds[other + 1] - 1
            start = p_first + int(rand() * (p_end - p_first))
            # Whole sentences from ``start`` until at least target - len(A) tokens (at least one sentence).
            stop = bisect_left(pool_cum, pool_cum[start] + target - a_len, start + 1, p_end + 1)
            if stop > p_end:
                stop = p_end
            b_start(pool_cum[start])
            b_lens(pool_cum[stop] - pool_cum[start])
            b_doc(pool_ids[other])
            random_next(1)
            i = a_end  # the chunk's sentences after A were not used: put them back
        else:
            b_start(cum[a_end])
            b_lens(cum[chunk_end] - cum[a_end])
            b_doc(doc_id)
            random_next(0)
            i = chunk_end


def truncation_cuts(
    len_a: np.ndarray, len_b: np.ndarray, max_num_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens truncate_seq_pair removes from A and from B, in closed form.

    Google removes one token at a time from the longer side (B on a tie) until the pair fits: the longer
    side loses the difference first, then B and A alternate, B first.
    """
    excess = np.maximum(len_a + len_b - max_num_tokens, 0)
    diff = np.abs(len_a - len_b)
    a_longer = len_a > len_b
    rest = np.maximum(excess - diff, 0)
    from_longer = np.minimum(excess, diff)
    cut_a = np.where(a_longer, from_longer, 0) + rest // 2
    cut_b = np.where(a_longer, 0, from_longer) + (rest + 1) // 2
    return cut_a, cut_b


def segment_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the ranges ``[starts[k], starts[k] + lengths[k])``, concatenated."""
    total = int(lengths.sum())
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(total, dtype=np.int64)


@dataclass
class ExampleArrays:
    """A batch of assembled examples as flat arrays plus per-example offsets (Arrow list layout)."""

    input_ids: np.ndarray  # (num_tokens,)
    token_type_ids: np.ndarray  # (num_tokens,) uint8
    offsets: np.ndarray  # (num_examples + 1,) int64
    len_a: np.ndarray  # (num_examples,) after truncation
    next_sentence_label: np.ndarray  # (num_examples,) int8
    a_doc_id: np.ndarray
    b_doc_id: np.ndarray
    truncated: np.ndarray  # (num_examples,) bool
    masked_lm_positions: np.ndarray | None = None  # (num_predictions,) uint16
    masked_lm_ids: np.ndarray | None = None
    masked_lm_offsets: np.ndarray | None = None  # (num_examples + 1,) int64

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def assemble_examples(
    spans: dict[str, np.ndarray],
    block_ids: np.ndarray,
    pool_ids: np.ndarray,
    max_num_tokens: int,
    cls_id: int,
    sep_id: int,
    rng: np.random.Generator,
) -> ExampleArrays:
    """Truncate each pair (random side per removed token) and build ``[CLS] A [SEP] B [SEP]``."""
    len_a, len_b = spans["a_len"], spans["b_len"]
    cut_a, cut_b = truncation_cuts(len_a, len_b, max_num_tokens)
    # Each removed token comes from the front or the back with probability 1/2, as in Google's loop.
    front_a = rng.binomial(cut_a, 0.5)
    front_b = rng.binomial(cut_b, 0.5)
    a_start, b_start = spans["a_start"] + front_a, spans["b_start"] + front_b
    len_a, len_b = len_a - cut_a, len_b - cut_b
    assert (len_a >= 1).all() and (len_b >= 1).all()

    lengths = len_a + len_b + 3
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = offsets[:-1]
    ids = np.empty(int(offsets[-1]), dtype=block_ids.dtype)
    ids[starts] = cls_id
    ids[starts + len_a + 1] = sep_id
    ids[offsets[1:] - 1] = sep_id
    ids[segment_index(starts + 1, len_a)] = block_ids[segment_index(a_start, len_a)]
    token_type_ids = np.zeros(len(ids), dtype=np.uint8)
    token_type_ids[offsets[1:] - 1] = 1
    random_next = spans["is_random_next"].astype(bool)
    for source, rows in ((block_ids, ~random_next), (pool_ids, random_next)):
        b_dest = segment_index((starts + len_a + 2)[rows], len_b[rows])
        ids[b_dest] = source[segment_index(b_start[rows], len_b[rows])]
        token_type_ids[b_dest] = 1
    return ExampleArrays(
        input_ids=ids,
        token_type_ids=token_type_ids,
        offsets=offsets,
        len_a=len_a,
        next_sentence_label=spans["is_random_next"].astype(np.int8),
        a_doc_id=spans["a_doc_id"],
        b_doc_id=spans["b_doc_id"],
        truncated=(cut_a + cut_b) > 0,
    )


def num_to_predict(lengths: np.ndarray, masked_lm_prob: float, max_predictions_per_seq: int) -> np.ndarray:
    """Google's ``min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))``.

    ``len(tokens)`` counts [CLS] and both [SEP]; np.rint rounds half to even like Python's round.
    """
    wanted = np.maximum(1, np.rint(lengths * masked_lm_prob).astype(np.int64))
    return np.minimum(wanted, max_predictions_per_seq)


def _special_positions(examples: ExampleArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, position, is_special) per token: [CLS] and both [SEP] are never candidates."""
    lengths = examples.lengths
    row = np.repeat(np.arange(examples.num_examples, dtype=np.int64), lengths)
    position = np.arange(len(examples.input_ids), dtype=np.int64) - np.repeat(examples.offsets[:-1], lengths)
    special = (position == 0) | (position == (examples.len_a + 1)[row]) | (position == (lengths - 1)[row])
    return row, position, special


def _choose_tokens(
    lengths: np.ndarray, len_a: np.ndarray, wanted: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random set of ``wanted[i]`` candidate positions per example: (row, position), ascending.

    On an (examples × max length) grid every position gets a random 64-bit key with the position in its low
    bits (so keys never tie); [CLS], [SEP] and padding get the largest key. The chosen positions are those
    at or below the ``wanted``-th smallest key of their row.
    """
    num_examples, width = len(lengths), int(lengths.max())
    column = np.arange(width, dtype=np.uint64)
    keys = rng.bit_generator.random_raw((num_examples, width))
    keys &= np.uint64(~((1 << COLUMN_BITS) - 1) & 0xFFFFFFFFFFFFFFFF)
    keys |= column
    col = column.astype(np.int64)
    never = (col == 0) | (col == (len_a + 1)[:, None]) | (col >= (lengths - 1)[:, None])
    keys[never] = np.iinfo(np.uint64).max
    most = int(wanted.max())
    smallest = np.sort(np.partition(keys, most - 1, axis=1)[:, :most], axis=1)
    threshold = smallest[np.arange(num_examples), wanted - 1]
    return np.nonzero(keys <= threshold[:, None])


def _choose_whole_words(
    row: np.ndarray,
    special: np.ndarray,
    word_start: np.ndarray,
    wanted: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Whole-word selection: words in random order, each taken when it still fits under ``wanted``.

    As Google's whole-word loop: a word that would overflow the budget is skipped and smaller later words
    may still fill it, so a word is never split.
    """
    num_examples = len(wanted)
    candidate = ~special
    word_of_token = np.cumsum(word_start) - 1  # valid on candidates only
    starts = np.flatnonzero(word_start)
    word_row = row[starts]
    word_size = np.bincount(word_of_token[candidate], minlength=len(starts))
    # Random order of the words within each example: sort by (row, random key).
    order = np.lexsort((rng.random(len(starts)), word_row))
    words_per_row = np.bincount(word_row, minlength=num_examples)
    column = np.arange(len(starts)) - np.repeat(np.cumsum(words_per_row) - words_per_row, words_per_row)
    width = int(words_per_row.max()) if len(starts) else 0
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
    word_taken = np.zeros(len(starts), dtype=bool)
    word_taken[order] = taken[word_row[order], column]
    chosen = np.zeros(len(row), dtype=bool)
    chosen[candidate] = word_taken[word_of_token[candidate]]
    return chosen


def mask_examples(
    examples: ExampleArrays,
    masked_lm_prob: float,
    max_predictions_per_seq: int,
    mask_id: int,
    replacement_ids: np.ndarray,
    rng: np.random.Generator,
    is_continuation: np.ndarray | None = None,
) -> dict[str, int]:
    """Static masking in place, as create_masked_lm_predictions; returns counts for the stats.

    Per example ``num_to_predict`` positions (never [CLS]/[SEP]); each 80% [MASK], 10% a random token drawn
    from ``replacement_ids`` (no special tokens), 10% unchanged. With ``is_continuation`` (a bool per vocab
    id, True for "##" pieces) whole words are chosen, never split. Positions come out ascending.
    """
    lengths = examples.lengths
    uncapped = np.maximum(1, np.rint(lengths * masked_lm_prob).astype(np.int64))
    wanted = np.minimum(num_to_predict(lengths, masked_lm_prob, max_predictions_per_seq), lengths - 3)
    ids = examples.input_ids
    if is_continuation is None:
        row, position = _choose_tokens(lengths, examples.len_a, wanted, rng)
        selected = examples.offsets[row] + position
        candidates = int((lengths - 3).sum())
    else:
        token_row, token_position, special = _special_positions(examples)
        after_special = np.zeros(len(ids), dtype=bool)
        after_special[1:] = special[:-1]
        # A "##" piece right after [CLS]/[SEP] (front truncation) starts a word of its own.
        word_start = ~special & (~is_continuation[ids] | after_special)
        selected = np.flatnonzero(_choose_whole_words(token_row, special, word_start, wanted, rng))
        row, position = token_row[selected], token_position[selected]
        candidates = int((~special).sum())
    # ``selected`` is ascending, so positions are ascending within each example.
    labels = ids[selected]  # fancy indexing copies
    draw = rng.random(len(selected))
    to_mask, to_random = draw < 0.8, draw >= 0.9
    ids[selected[to_mask]] = mask_id
    ids[selected[to_random]] = replacement_ids[rng.integers(0, len(replacement_ids), int(to_random.sum()))]
    counts = np.bincount(row, minlength=examples.num_examples)
    examples.masked_lm_positions = position.astype(np.uint16)
    examples.masked_lm_ids = labels
    examples.masked_lm_offsets = np.zeros(examples.num_examples + 1, dtype=np.int64)
    np.cumsum(counts, out=examples.masked_lm_offsets[1:])
    return {
        "masked": len(selected),
        "masked_as_mask": int(to_mask.sum()),
        "masked_as_random": int(to_random.sum()),
        "capped": int((uncapped > max_predictions_per_seq).sum()),
        "candidates": candidates,
    }


def document_rng(seed: int, split: int, shard: int, doc_id: int, dupe_round: int) -> random.Random:
    """The rng of one document in one dupe round: a function of the seed and where the document is."""
    key = (((seed & 0xFFFFFFFF) << 128) | (split << 120) | (shard << 96) | (dupe_round << 64)) + (
        doc_id & 0xFFFFFFFFFFFFFFFF
    )
    return random.Random(key)


def batch_rng(seed: int, split: int, shard: int, batch: int) -> np.random.Generator:
    """The rng of one batch of examples (truncation sides and masking)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, split, shard, batch, 0xE8A3])
