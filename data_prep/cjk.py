"""Chinese and Japanese text: which characters are CJK, and the rules every stage applies to them.

Chinese and Japanese write words without spaces, so four things differ from space-separated scripts:

- *line joins*: a line break between two CJK characters (ideographs, kana) or next to CJK punctuation is no
  word boundary, so hard-wrapped lines join there with no space (``难以合作\\n的人`` → ``难以合作的人``);
- *sentence ends*: ``。！？｡`` (and ``!?`` right after an ideograph or kana) end a sentence even when more
  text follows at once, with the closing quotes and brackets after them (``」』”）】》``) kept with it.
  The fullwidth ``．`` is not one: this corpus uses it as a separator (``《忽然想到．七》``);
- *counts*: a "word" is each ideograph or kana character, plus each whitespace-separated run of other text
  that holds a letter or digit (Hangul is written with spaces and counts by them);
- *decoding*: WordPiece tokens join by the same rule as lines.
"""

from __future__ import annotations

import re

# Code point ranges (inclusive). Han: the CJK Unified Ideographs and their extensions and compatibility
# forms (BERT's ``_is_chinese_char`` ranges, which its normalizer splits into one word each); kana:
# hiragana, katakana and halfwidth katakana.
_HAN = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF))
_KANA = ((0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))
# CJK punctuation and forms that sit between CJK characters without spaces: CJK symbols and punctuation
# (。、「」《》), bopomofo, enclosed and compatibility forms, vertical and small forms, fullwidth forms.
_CJK_PUNCTUATION = (
    (0x3000, 0x303F),
    (0x3100, 0x312F),
    (0x31A0, 0x31BF),
    (0x3200, 0x33FF),
    (0xFE10, 0xFE1F),
    (0xFE30, 0xFE4F),
    (0xFF00, 0xFF65),
)


def _python_class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in ranges)


def _re2_class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(f"\\x{{{lo:X}}}-\\x{{{hi:X}}}" for lo, hi in ranges)


CJK_WORD_CHARS = re.compile(f"[{_python_class(_HAN + _KANA)}]")
"""One ideograph or kana character: a word of its own in the counts."""
CJK_WORD_CHARS_RE2 = f"[{_re2_class(_HAN + _KANA)}]"
"""The same class for pyarrow's (RE2) regex kernels."""
_CJK_MARK = re.compile(f"[{_python_class(_CJK_PUNCTUATION)}]")
_HAS_ALNUM = re.compile(r"[^\W_]")
HAS_ALNUM_RE2 = r"[\pL\pN]"
"""A letter or digit, for pyarrow's regex kernels: what makes a whitespace-separated run a word."""

_CLOSERS = "」』”’）】》〉〕］｝〗〙〞"  # may follow the end after a space (``足? ”``)
_ASCII_CLOSERS = "\"')\\]}"  # only right after it: ``"`` also opens the next sentence
# A sentence end: 。！？｡ (or !? after an ideograph or kana), more of them, then closing quotes and brackets;
# a split only where more text follows that does not continue the clause (，、；： after a closing quote).
_SENTENCE_END = re.compile(
    # first a plain character class, which re scans for quickly; then "!?" must follow an ideograph or kana
    f"[。！？｡!?](?<![^{_python_class(_HAN + _KANA)}][!?])(?<!^[!?])[。！？｡!?]*"
    f"(?:\\s*[{_CLOSERS}]|[{_ASCII_CLOSERS}])*+"  # possessive: no split between an end and its closer
    f"(?=\\s*[^\\s，、；：,;:])"
)


def joins_without_space(left: str, right: str) -> bool:
    """Whether text ending in ``left`` and text starting with ``right`` meet with no space between them: two
    ideographs or kana, or a CJK punctuation mark on either side (``。`` takes no space after ``Debian``)."""
    if not (left and right):
        return False
    a, b = left[-1], right[0]
    return bool(
        _CJK_MARK.match(a) or _CJK_MARK.match(b) or (CJK_WORD_CHARS.match(a) and CJK_WORD_CHARS.match(b))
    )


def join_lines(lines: list[str]) -> str:
    """Hard-wrapped lines as one paragraph: whitespace collapsed to one space, none across a line break
    between two CJK characters (Latin words, and CJK next to Latin, still join with a space) unless the line
    ends in an ideographic space (U+3000, a verse or column separator)."""
    joined: list[str] = []
    spaced = False  # the line before ended in an ideographic space: a separator its author wrote
    for line in lines:
        words = " ".join(line.split())
        if not words:
            continue
        if joined and (spaced or not joins_without_space(joined[-1], words)):
            joined.append(" ")
        joined.append(words)
        spaced = line.rstrip(" \t\r\f\v\xa0").endswith("\u3000")
    return "".join(joined)


def split_cjk_sentences(text: str) -> list[str]:
    """``text`` cut after every CJK sentence end that more text follows; pieces stripped, empties dropped."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p for p in (p.strip() for p in pieces) if p]


_LEADING_CLOSERS = re.compile(f"[{_CLOSERS})\\]}}]+")  # not quotes: ASCII ``"`` opens as often as it closes


def reattach_closers(sentences: list[str]) -> list[str]:
    """Closing quotes and brackets that a splitter left at the start of a sentence (sentencex cuts ``。）``
    before the bracket) moved back to the end of the sentence before."""
    attached: list[str] = []
    for sentence in sentences:
        closers = _LEADING_CLOSERS.match(sentence)
        if closers and attached:
            attached[-1] += closers.group()
            sentence = sentence[closers.end() :].lstrip()
        if sentence:
            attached.append(sentence)
    return attached


def count_words(text: str) -> tuple[int, int]:
    """(words, CJK characters) of ``text``: each ideograph or kana is a word, and so is each
    whitespace-separated run of the rest that holds a letter or digit."""
    num_cjk = len(CJK_WORD_CHARS.findall(text))
    rest = CJK_WORD_CHARS.sub(" ", text) if num_cjk else text
    return num_cjk + sum(1 for word in rest.split() if _HAS_ALNUM.search(word)), num_cjk


def decode_wordpieces(tokens: list[str]) -> str:
    """Readable text of WordPiece tokens: ``##`` pieces glued on, spaces between words but not between CJK
    characters or at CJK punctuation, special tokens apart (``[CLS] 在 debian 这 种 规 模 ， 很 难 。 [SEP]``
    reads ``[CLS] 在 debian 这种规模，很难。 [SEP]``)."""
    text, after_special = "", False
    for token in tokens:
        special = token.startswith("[") and token.endswith("]") and len(token) > 2  # [CLS], [MASK], [UNK]
        if token.startswith("##") and text:
            text += token[2:]
        elif text and (special or after_special or not joins_without_space(text, token)):
            text += " " + token
        else:
            text += token
        after_special = special
    return text
