"""Sentence splitting of a paragraph: sentencex for the language, CJK sentence ends, over-long sentences re-split.

The shard stage calls ``split_sentences`` on every paragraph; nothing here reads files or knows of shards.
"""

from __future__ import annotations

import re
from collections import Counter

import sentencex

from data_prep.cjk import reattach_closers, split_cjk_sentences

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s+)(?=[\"'(\[]*[A-Z0-9])")  # group 1: the gap to split at
_CJK_CLAUSE_ENDS = "，；、："  # where a long run of CJK text without spaces is best cut


def chunk_on_whitespace(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, at the last space or CJK clause end (``，；、：``,
    which Chinese and Japanese write without spaces) before the limit if any."""
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        cut = text.rfind(" ", start, start + max_chars + 1)
        clause = max(text.rfind(c, start, start + max_chars) for c in _CJK_CLAUSE_ENDS) + 1
        if clause > max(cut, start):  # cut after the clause's punctuation
            end = next_start = clause
        elif cut > start:
            end, next_start = cut, cut + 1
        else:  # no space: a hard cut inside one huge "word" (or between two CJK characters)
            end = next_start = start + max_chars
        pieces.append(text[start:end])
        start = next_start
    pieces.append(text[start:])
    return [p for p in (p.strip() for p in pieces) if p]


def split_long_sentence(sentence: str, max_chars: int) -> list[str]:
    """Re-split an over-long "sentence" at sentence punctuation, then cut what is still too long on spaces.

    sentencex never splits inside quotes or brackets, so one unbalanced ``(`` or ``"`` can swallow a
    whole paragraph; those paragraphs are what this fallback sees.
    """
    pieces = []
    starts = [0] + [m.end(1) for m in _SENTENCE_END.finditer(sentence)]
    ends = [m.start(1) for m in _SENTENCE_END.finditer(sentence)] + [len(sentence)]
    for start, end in zip(starts, ends, strict=True):
        piece = sentence[start:end].strip()
        if len(piece) > max_chars:
            pieces.extend(chunk_on_whitespace(piece, max_chars))
        elif piece:
            pieces.append(piece)
    return pieces


def split_sentences(paragraph: str, language: str, max_sentence_chars: int, stats: Counter) -> list[str]:
    """Sentences of one paragraph (sentencex, then cut after every CJK sentence end), stripped; over-long
    ones re-split and counted.

    sentencex keeps quotes together, so an unbalanced or mismatched quote (``“control D"``) hides every
    ``。`` after it; ``。！？`` are unambiguous sentence ends, so ``split_cjk_sentences`` cuts there whatever
    the language and the quotes around them.
    """
    sentences = []
    pieces = [p for segment in sentencex.segment(language, paragraph) for p in split_cjk_sentences(segment)]
    for sentence in reattach_closers(pieces):
        if len(sentence) > max_sentence_chars:
            stats["long_sentences_split"] += 1
            sentences.extend(split_long_sentence(sentence, max_sentence_chars))
        else:
            sentences.append(sentence)
    return sentences
