"""Chinese word segmentation for whole-word masking, as the Chinese whole-word-masking BERTs do it.

Tokens stay characters (BERT's normalizer makes every Han character a word of its own); a word segmenter
(jieba) finds which characters form one word, and whole-word masking chooses and masks them together. The
token cache (data_prep/tokcache.py) stores the result per token, ``continues_word``: True for a Han
character in the same jieba word as the Han character token before it. Only Han characters group this
way: Latin words in mixed text still group by their "##" pieces, whatever jieba makes of them.

Segmentation is a pure function of the sentence and jieba's dictionary, so the cache does not depend on
workers; the segmenter's name and version are part of the cache key and of the examples' metadata.
"""

from __future__ import annotations

import functools
import logging
import re

import numpy as np

SEGMENTER = "jieba"
# Corpus languages (the shard manifest's ``language``, primary subtag) segmented with jieba: Chinese.
CHINESE_LANGUAGES = frozenset({"zh", "yue", "lzh", "wuu", "gan", "hak", "hsn", "cdo"})
# Han ideographs: the ranges of BERT's ``_is_chinese_char``, which its normalizer splits one per token.
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


def segmenter_for(language: str | None) -> str | None:
    """``segmenter_name()`` when text in ``language`` is segmented into words, else None."""
    if language is None or language.lower().split("-", 1)[0] not in CHINESE_LANGUAGES:
        return None
    return segmenter_name()


def segmenter_name() -> str:
    """The segmenter and its version, as the cache key and the examples' metadata record it."""
    return f"{SEGMENTER} {_jieba().__version__}"


def _jieba():
    try:
        import jieba
    except ImportError as e:  # a declared dependency; a clear message when an environment lacks it
        raise ImportError("Chinese whole-word masking needs jieba: pip install 'jieba>=0.42'") from e
    logging.getLogger("jieba").setLevel(logging.WARNING)  # not its "Building prefix dict" lines per process
    return jieba


@functools.cache
def _tokenizer():
    """The process's jieba tokenizer, dictionary loaded (about 1 s; forked workers inherit a loaded one)."""
    tokenizer = _jieba().Tokenizer()
    tokenizer.initialize()
    return tokenizer


def load() -> None:
    """Load jieba's dictionary now, e.g. in a parent before it forks workers."""
    _tokenizer()


def words(sentence: str) -> list[str]:
    """jieba's words of ``sentence`` (accurate mode with HMM, its default); they concatenate to it."""
    return list(_tokenizer().cut(sentence))


def continues_word(sentence: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Per token of ``sentence`` (character ``offsets`` from the tokenizer): True for a Han character token
    in the same jieba word as the token before it, itself a Han character."""
    flags = np.zeros(len(offsets), dtype=bool)
    if len(offsets) < 2 or not _HAN.search(sentence):
        return flags
    word_of_char = np.empty(len(sentence), dtype=np.int64)
    position = 0
    for k, word in enumerate(words(sentence)):
        word_of_char[position : position + len(word)] = k
        position += len(word)
    assert position == len(sentence), "jieba's words do not add up to the sentence"
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    han = np.array([end - start == 1 and _HAN.match(sentence[start]) is not None for start, end in offsets])
    word = word_of_char[np.minimum(starts, len(sentence) - 1)]
    flags[1:] = han[1:] & han[:-1] & (word[1:] == word[:-1])
    return flags


def sentences_continue_word(sentences: list[str], encodings: list) -> np.ndarray:
    """``continues_word`` of a batch of tokenised sentences, flat (one value per token, in order)."""
    parts = [
        continues_word(s, e.offsets) if _HAN.search(s) else np.zeros(len(e), dtype=bool)
        for s, e in zip(sentences, encodings, strict=True)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
