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

from data_prep import masking
from data_prep.masking import num_to_predict  # noqa: F401 (part of this module's interface)

MIN_MAX_SEQ_LENGTH = 8  # [CLS] A [SEP] B [SEP] with a target of at least 2 tokens and room to truncate


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
    # (num_tokens,) bool: the token is in the same Chinese word as the one before it (data_prep/zh_words.py);
    # None when the corpus was not segmented
    continues_word: np.ndarray | None = None

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
    continues_word: np.ndarray | None = None  # (num_tokens,) bool, segmenter words; False at/after specials
    word_start: np.ndarray | None = None  # (num_tokens,) bool, whole-word masking words (dynamic mode)

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
    block_continues: np.ndarray | None = None,
    pool_continues: np.ndarray | None = None,
) -> ExampleArrays:
    """Truncate each pair (random side per removed token) and build ``[CLS] A [SEP] B [SEP]``.

    ``block_continues`` / ``pool_continues`` (the blocks' ``continues_word``): carried along into the
    examples' ``continues_word``, False at [CLS]/[SEP] and after them (a word cut by truncation starts anew).
    """
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
    a_dest, a_source = segment_index(starts + 1, len_a), segment_index(a_start, len_a)
    ids[a_dest] = block_ids[a_source]
    token_type_ids = np.zeros(len(ids), dtype=np.uint8)
    token_type_ids[offsets[1:] - 1] = 1
    continues = None
    if block_continues is not None and pool_continues is not None:
        continues = np.zeros(len(ids), dtype=bool)
        continues[a_dest] = block_continues[a_source]
    random_next = spans["is_random_next"].astype(bool)
    for source, rows, source_continues in (
        (block_ids, ~random_next, block_continues),
        (pool_ids, random_next, pool_continues),
    ):
        b_dest, b_source = (
            segment_index((starts + len_a + 2)[rows], len_b[rows]),
            segment_index(b_start[rows], len_b[rows]),
        )
        ids[b_dest] = source[b_source]
        token_type_ids[b_dest] = 1
        if continues is not None:
            continues[b_dest] = source_continues[b_source]
    if continues is not None:
        continues[starts + 1] = False  # first of A
        continues[starts + len_a + 2] = False  # first of B
    return ExampleArrays(
        input_ids=ids,
        token_type_ids=token_type_ids,
        offsets=offsets,
        len_a=len_a,
        next_sentence_label=spans["is_random_next"].astype(np.int8),
        a_doc_id=spans["a_doc_id"],
        b_doc_id=spans["b_doc_id"],
        truncated=(cut_a + cut_b) > 0,
        continues_word=continues,
    )


def example_candidates(examples: ExampleArrays, never_ids: np.ndarray | None = None) -> np.ndarray:
    """True per token that may be predicted: not [CLS]/[SEP] (by position) nor any id of ``never_ids``
    (``masking.never_predicted_ids``: [PAD] [UNK] [CLS] [SEP] [MASK])."""
    lengths = examples.lengths
    row, position = masking.rows_and_positions(examples.offsets)
    special = (position == 0) | (position == (examples.len_a + 1)[row]) | (position == (lengths - 1)[row])
    if never_ids is not None:
        special |= np.isin(examples.input_ids, never_ids)
    return ~special


def example_word_starts(
    examples: ExampleArrays, is_continuation: np.ndarray | None, never_ids: np.ndarray | None = None
) -> np.ndarray:
    """Where the words of whole-word masking begin: "##" pieces (``is_continuation``, per vocabulary id)
    and, when the examples carry them, the segmenter's Chinese words (``examples.continues_word``)."""
    candidate = example_candidates(examples, never_ids)
    return masking.word_starts(
        examples.input_ids, examples.offsets, candidate, is_continuation, examples.continues_word
    )


def mask_examples(
    examples: ExampleArrays,
    masked_lm_prob: float,
    max_predictions_per_seq: int,
    mask_id: int,
    replacement_ids: np.ndarray,
    rng: np.random.Generator,
    is_continuation: np.ndarray | None = None,
    never_ids: np.ndarray | None = None,
) -> dict[str, int]:
    """Static masking in place, by the rule of data_prep/masking.py; returns counts for the stats.

    Per example ``num_to_predict`` positions, never [CLS]/[SEP] nor an id of ``never_ids`` ([PAD] [UNK]
    [MASK] too, ``masking.never_predicted_ids``); each 80% [MASK], 10% a random token drawn from
    ``replacement_ids`` (no special tokens), 10% unchanged. With ``is_continuation`` (a bool per vocab id,
    True for "##" pieces) whole words are chosen, never split, the segmenter's words too when the examples
    carry them (``continues_word``). Positions come out ascending.
    """
    lengths = examples.lengths
    uncapped = np.maximum(1, np.rint(lengths * masked_lm_prob).astype(np.int64))
    candidate = example_candidates(examples, never_ids)
    word_start = None
    if is_continuation is not None:
        word_start = masking.word_starts(
            examples.input_ids, examples.offsets, candidate, is_continuation, examples.continues_word
        )
    ids = examples.input_ids
    selected, _ = masking.choose_predictions(
        ids, examples.offsets, candidate, masked_lm_prob, max_predictions_per_seq, rng, word_start
    )
    # ``selected`` is ascending, so positions are ascending within each example.
    labels, to_mask, to_random = masking.replace_80_10_10(ids, selected, mask_id, replacement_ids, rng)
    row = np.searchsorted(examples.offsets, selected, side="right") - 1
    counts = np.bincount(row, minlength=examples.num_examples)
    examples.masked_lm_positions = (selected - examples.offsets[row]).astype(np.uint16)
    examples.masked_lm_ids = labels
    examples.masked_lm_offsets = np.zeros(examples.num_examples + 1, dtype=np.int64)
    np.cumsum(counts, out=examples.masked_lm_offsets[1:])
    return {
        "masked": len(selected),
        "masked_as_mask": int(to_mask.sum()),
        "masked_as_random": int(to_random.sum()),
        "capped": int((uncapped > max_predictions_per_seq).sum()),
        "candidates": int(candidate.sum()),
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
