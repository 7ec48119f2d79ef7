"""Unit tests of the example-building functions (data_prep/examples.py) on toy token ids."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_prep import examples as ex
from data_prep.schema import continuation_table, replacement_ids

CLS, SEP, MASK = 2, 3, 4
SPECIAL = {"pad": 0, "unk": 1, "cls": CLS, "sep": SEP, "mask": MASK}
VOCAB_SIZE = 200  # ids 5..199 are words; ids >= 150 are "##" continuations


def toy_tokens() -> list[str]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"w{i}" for i in range(5, 150)] + [f"##c{i}" for i in range(150, VOCAB_SIZE)]
    return tokens


def make_block(doc_sentence_lengths: list[list[int]], doc_ids: list[int], seed: int = 0) -> ex.DocumentBlock:
    """A DocumentBlock of random word ids with the given sentence lengths per document."""
    rng = np.random.default_rng(seed)
    sent_offsets, doc_bounds, total = [], [0], 0
    for lengths in doc_sentence_lengths:
        sent_offsets.append(total)
        for n in lengths:
            total += n
            sent_offsets.append(total)
        doc_bounds.append(len(sent_offsets))
    ids = rng.integers(5, VOCAB_SIZE, size=total).astype(np.uint16)
    return ex.DocumentBlock(ids, sent_offsets, doc_bounds, doc_ids)


def random_corpus(num_docs: int, seed: int, max_sentences: int = 40) -> ex.DocumentBlock:
    rng = random.Random(seed)
    lengths = [[rng.randint(1, 30) for _ in range(rng.randint(1, max_sentences))] for _ in range(num_docs)]
    return make_block(lengths, [1000 + d for d in range(num_docs)], seed)


def google_reference(block, doc, pool, max_num_tokens, short_seq_prob, rng) -> list[tuple]:
    """create_instances_from_document written as Google loops (per-chunk target), same draws as ours."""
    first, end = block.doc_bounds[doc], block.doc_bounds[doc + 1] - 1
    document = [(block.sent_offsets[s], block.sent_offsets[s + 1]) for s in range(first, end)]
    out, chunk, length, i = [], [], 0, 0
    target = None
    while i < len(document):
        if not chunk:
            target = max_num_tokens
            short = rng.random() < short_seq_prob
            if short:
                target = ex.draw_int(rng, 2, max_num_tokens)
        seg = document[i]
        chunk.append(seg)
        length += seg[1] - seg[0]
        if i == len(document) - 1 or length >= target:
            a_end = 1 if len(chunk) == 1 else ex.draw_int(rng, 1, len(chunk) - 1)
            a = (chunk[0][0], chunk[a_end - 1][1])
            if len(chunk) == 1 or rng.random() < 0.5:
                other = ex.draw_int(rng, 0, pool.num_docs - 1)
                for _ in range(9):
                    if pool.doc_ids[other] != block.doc_ids[doc]:
                        break
                    other = ex.draw_int(rng, 0, pool.num_docs - 1)
                p_first, p_end = pool.doc_bounds[other], pool.doc_bounds[other + 1] - 1
                start = ex.draw_int(rng, p_first, p_end - 1)
                b_len, j = 0, start
                for j in range(start, p_end):
                    b_len = pool.sent_offsets[j + 1] - pool.sent_offsets[start]
                    if b_len >= target - (a[1] - a[0]):
                        break
                out.append((a[0], a[1] - a[0], pool.sent_offsets[start], b_len, 1))
                i -= len(chunk) - a_end
            else:
                b = (chunk[a_end][0], chunk[-1][1])
                out.append((a[0], a[1] - a[0], b[0], b[1] - b[0], 0))
            chunk, length = [], 0
        i += 1
    return out


def segment_all(block, pool, max_num_tokens=61, short_seq_prob=0.1, seed=0, rounds=1) -> ex.SpanLists:
    spans = ex.SpanLists()
    for r in range(rounds):
        for d in range(block.num_docs):
            rng = ex.document_rng(seed, 0, 0, block.doc_ids[d], r)
            ex.segment_document(block, d, pool, max_num_tokens, short_seq_prob, rng, spans)
    return spans


def test_segment_document_matches_google_loop():
    block = random_corpus(30, seed=1)
    pool = random_corpus(12, seed=2)
    for doc in range(block.num_docs):
        ours = ex.SpanLists()
        ex.segment_document(block, doc, pool, 61, 0.3, random.Random(doc), ours)
        got = list(zip(ours.a_start, ours.a_len, ours.b_start, ours.b_len, ours.is_random_next, strict=True))
        assert got == google_reference(block, doc, pool, 61, 0.3, random.Random(doc))


def test_pairs_positive_follow_a_negative_from_other_document():
    block = random_corpus(60, seed=3)
    spans = segment_all(block, block, rounds=3)
    n = len(spans)
    assert n > 1000
    sentence_starts = set(block.sent_offsets)
    random_next = np.array(spans.is_random_next)
    for i in range(n):
        assert spans.a_start[i] in sentence_starts and spans.b_start[i] in sentence_starts
        assert spans.a_start[i] + spans.a_len[i] in sentence_starts  # A ends on a sentence boundary
        assert spans.a_len[i] >= 1 and spans.b_len[i] >= 1
        if random_next[i]:
            assert spans.b_doc_id[i] != spans.a_doc_id[i]
        else:
            assert spans.b_doc_id[i] == spans.a_doc_id[i]
            assert spans.b_start[i] == spans.a_start[i] + spans.a_len[i]  # B follows A
    # 50% random, plus the chunks of one sentence that are always random (Google's rule).
    assert 0.45 < random_next.mean() < 0.62


def test_single_sentence_documents_yield_random_next_examples():
    block = make_block([[10], [12], [7, 8, 9]], [1, 2, 3])
    spans = segment_all(block, block)
    first_two = [i for i, d in enumerate(spans.a_doc_id) if d in (1, 2)]
    assert len(first_two) == 2
    assert all(spans.is_random_next[i] == 1 and spans.b_doc_id[i] != spans.a_doc_id[i] for i in first_two)


def google_truncate(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    cut_a = cut_b = 0
    while len_a + len_b > max_num_tokens:
        if len_a > len_b:
            len_a, cut_a = len_a - 1, cut_a + 1
        else:
            len_b, cut_b = len_b - 1, cut_b + 1
    return cut_a, cut_b


def test_truncation_cuts_match_googles_loop():
    grid = np.array([(a, b) for a in range(1, 45) for b in range(1, 45)])
    for max_num_tokens in (5, 13, 20, 61):
        cut_a, cut_b = ex.truncation_cuts(grid[:, 0], grid[:, 1], max_num_tokens)
        expected = np.array([google_truncate(a, b, max_num_tokens) for a, b in grid])
        np.testing.assert_array_equal(np.stack([cut_a, cut_b], 1), expected)


def build(seed=0, max_seq_length=64, rounds=5):
    block = random_corpus(80, seed=seed)
    spans = segment_all(block, block, max_num_tokens=max_seq_length - 3, seed=seed, rounds=rounds)
    taken = spans.take(len(spans))
    arrays = ex.assemble_examples(
        taken, block.ids, block.ids, max_seq_length - 3, CLS, SEP, np.random.default_rng(seed)
    )
    return block, taken, arrays


def test_assembled_examples_have_cls_sep_types_and_source_tokens():
    block, taken, arrays = build()
    lengths = arrays.lengths
    assert (lengths <= 64).all() and (lengths >= 5).all()
    assert arrays.truncated.any()
    for i in range(arrays.num_examples):
        row = arrays.input_ids[arrays.offsets[i] : arrays.offsets[i + 1]]
        types = arrays.token_type_ids[arrays.offsets[i] : arrays.offsets[i + 1]]
        la = int(arrays.len_a[i])
        assert row[0] == CLS and row[la + 1] == SEP and row[-1] == SEP
        assert (
            not np.isin(row[1 : la + 1], [CLS, SEP]).any() and not np.isin(row[la + 2 : -1], [CLS, SEP]).any()
        )
        assert (types[: la + 2] == 0).all() and (types[la + 2 :] == 1).all()
        # A is a contiguous window of its source span (truncated at the front and/or back).
        a_src = block.ids[taken["a_start"][i] : taken["a_start"][i] + taken["a_len"][i]]
        window = row[1 : la + 1]
        assert any(np.array_equal(a_src[k : k + la], window) for k in range(len(a_src) - la + 1))


def test_truncation_sides_are_random():
    _, taken, arrays = build(seed=5)
    cut = taken["a_len"] - arrays.len_a
    front_cut, back_cut = 0, 0
    # Count A windows that dropped their first token vs their last, among examples with A cut once.
    block = random_corpus(80, seed=5)
    for i in np.flatnonzero(cut == 1):
        window = arrays.input_ids[arrays.offsets[i] + 1 : arrays.offsets[i] + 1 + arrays.len_a[i]]
        src = block.ids[taken["a_start"][i] : taken["a_start"][i] + taken["a_len"][i]]
        if np.array_equal(window, src[1:]):
            front_cut += 1
        elif np.array_equal(window, src[:-1]):
            back_cut += 1
    assert front_cut > 10 and back_cut > 10


def masked(seed=0, whole_word=False, max_predictions=9, prob=0.15):
    block, taken, arrays = build(seed=seed)
    original = arrays.input_ids.copy()
    continuation = continuation_table(toy_tokens()) if whole_word else None
    replacement = replacement_ids(toy_tokens(), SPECIAL)
    counts = ex.mask_examples(
        arrays, prob, max_predictions, MASK, replacement, np.random.default_rng(seed + 7), continuation
    )
    return original, arrays, counts


def test_masking_statistics_and_invariants():
    original, arrays, counts = masked()
    assert arrays.num_examples > 2000
    wanted = ex.num_to_predict(arrays.lengths, 0.15, 9)
    per_example = np.diff(arrays.masked_lm_offsets)
    np.testing.assert_array_equal(per_example, wanted)
    assert counts["capped"] > 0  # 64-token examples want round(9.6) = 10 > 9
    positions, labels = arrays.masked_lm_positions.astype(np.int64), arrays.masked_lm_ids
    row = np.repeat(np.arange(arrays.num_examples), per_example)
    flat = arrays.offsets[row] + positions
    np.testing.assert_array_equal(original[flat], labels)
    assert not np.isin(labels, [CLS, SEP]).any()  # never [CLS]/[SEP]
    for i in range(0, arrays.num_examples, 97):
        p = positions[arrays.masked_lm_offsets[i] : arrays.masked_lm_offsets[i + 1]]
        assert (np.diff(p) > 0).all()  # ascending, no repeats
    # Outside the predicted positions nothing changed.
    untouched = np.ones(len(original), dtype=bool)
    untouched[flat] = False
    np.testing.assert_array_equal(arrays.input_ids[untouched], original[untouched])
    new = arrays.input_ids[flat]
    as_mask = (new == MASK).mean()
    kept = (new == labels).mean()
    replaced = 1 - as_mask - kept
    # Random replacements may hit the original id (1/195 of the time), as in Google's scheme.
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01
    changed = new[(new != MASK) & (new != labels)]
    assert len(changed) > 1000 and changed.min() >= 5  # replacements are never special tokens


def test_replacement_ids_exclude_special_and_reserved_tokens():
    tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "[", "##b"]
    special = {"pad": 0, "unk": 2, "cls": 3, "sep": 4, "mask": 5}
    assert replacement_ids(tokens, special).tolist() == [6, 7, 8]


def test_whole_word_masking_never_splits_a_word():
    original, arrays, counts = masked(seed=2, whole_word=True, max_predictions=12)
    is_cont = continuation_table(toy_tokens())
    assert counts["masked"] > 1000
    per_example = np.diff(arrays.masked_lm_offsets)
    assert (per_example <= 12).all()
    for i in range(arrays.num_examples):
        row = original[arrays.offsets[i] : arrays.offsets[i + 1]]
        chosen = np.zeros(len(row), dtype=bool)
        chosen[arrays.masked_lm_positions[arrays.masked_lm_offsets[i] : arrays.masked_lm_offsets[i + 1]]] = (
            True
        )
        special = np.isin(row, [CLS, SEP])
        assert not (chosen & special).any()
        for p in range(1, len(row)):
            if is_cont[row[p]] and not special[p - 1]:
                assert chosen[p] == chosen[p - 1], f"example {i}: word split at {p}"


def test_num_to_predict_rounds_like_python():
    lengths = np.array([5, 10, 30, 50, 70, 128])
    expected = [min(20, max(1, int(round(n * 0.15)))) for n in lengths]
    assert ex.num_to_predict(lengths, 0.15, 20).tolist() == expected


def test_rngs_differ_by_every_coordinate():
    base = ex.document_rng(1, 0, 0, 5, 0).random()
    for args in [(2, 0, 0, 5, 0), (1, 1, 0, 5, 0), (1, 0, 1, 5, 0), (1, 0, 0, 6, 0), (1, 0, 0, 5, 1)]:
        assert ex.document_rng(*args).random() != base
    assert ex.document_rng(1, 0, 0, -5, 0).random() != base  # negative doc ids are fine
    assert ex.batch_rng(1, 0, 0, 0).random() != ex.batch_rng(1, 0, 0, 1).random()


@pytest.mark.parametrize("max_seq_length", [8, 9, 16])
def test_tiny_lengths_still_valid(max_seq_length):
    block = random_corpus(20, seed=4)
    spans = segment_all(block, block, max_num_tokens=max_seq_length - 3)
    taken = spans.take(len(spans))
    arrays = ex.assemble_examples(
        taken, block.ids, block.ids, max_seq_length - 3, CLS, SEP, np.random.default_rng(0)
    )
    assert arrays.lengths.max() <= max_seq_length and (arrays.len_a >= 1).all()
    ex.mask_examples(arrays, 0.15, 1, MASK, replacement_ids(toy_tokens(), SPECIAL), np.random.default_rng(1))
    assert (np.diff(arrays.masked_lm_offsets) == 1).all()
