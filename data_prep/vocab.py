"""WordPiece vocabularies: load an existing one (vocab stage, HF tokenizer directory, vocab.txt) or train one.

Every vocabulary is used through a ``tokenizers.Tokenizer`` with BERT's normalizer, pre-tokenizer and
WordPiece model. ``load_vocab`` returns it with the special-token ids and the vocabulary fingerprint that
downstream stages record in their metadata.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from data_prep.manifest import MANIFEST, StageError, read_manifest
from data_prep.schema import SPECIAL_ID_NAMES, SPECIAL_TOKENS, vocab_fingerprint

log = logging.getLogger(__name__)

MAX_INPUT_CHARS_PER_WORD = 100  # BERT's limit: a longer "word" becomes a single [UNK]


@dataclass
class Vocab:
    """A loaded vocabulary: its tokenizer, tokens in id order, special ids, casing and fingerprint."""

    tokenizer: tokenizers.Tokenizer  # encode(text, add_special_tokens=False) gives bare WordPiece ids
    tokens: list[str]  # id order
    special_ids: dict[str, int]  # {"pad", "unk", "cls", "sep", "mask"} -> id
    lowercase: bool
    fingerprint: str  # data_prep.schema.vocab_fingerprint(tokens)

    @property
    def size(self) -> int:
        return len(self.tokens)


def bert_tokenizer(vocab: dict[str, int], lowercase: bool) -> tokenizers.Tokenizer:
    """A BERT WordPiece tokenizer (normalizer, pre-tokenizer, post-processor, decoder) over ``vocab``."""
    tokenizer = tokenizers.Tokenizer(
        models.WordPiece(
            vocab,
            unk_token="[UNK]",
            continuing_subword_prefix="##",
            max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
        )
    )
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    add_bert_post_processor(tokenizer)
    tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
    return tokenizer


def add_bert_post_processor(tokenizer: tokenizers.Tokenizer) -> None:
    """``[CLS] $A [SEP]`` / ``[CLS] $A [SEP] $B:1 [SEP]:1``, as every BERT checkpoint does."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        return  # load_vocab reports the missing tokens
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def read_vocab_txt(path: str | os.PathLike) -> list[str]:
    """The tokens of a BERT vocab.txt, one per line, in id order."""
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n").rstrip("\r") for line in f]
    while tokens and tokens[-1] == "":  # a trailing newline is not a token
        tokens.pop()
    return tokens


def write_vocab_txt(path: str | os.PathLike, tokens: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{t}\n" for t in tokens))


def _normalizer_lowercases(normalizer: dict | None) -> bool | None:
    """Whether a tokenizer.json normalizer lowercases: True/False, or None when it has no normalizer."""
    if not normalizer:
        return None
    kind = normalizer.get("type")
    if kind == "BertNormalizer":
        return bool(normalizer.get("lowercase", True))
    if kind == "Lowercase":
        return True
    if kind == "Sequence":
        return any(_normalizer_lowercases(n) for n in normalizer.get("normalizers", []))
    return False


def _tokens_of(tokenizer: tokenizers.Tokenizer, where: Path) -> list[str]:
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise StageError(f"{where}: token ids are not contiguous from 0; this is not a BERT vocabulary")
    return [by_id[i] for i in range(len(by_id))]


def _resolve_vocab_files(path: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(tokenizer.json, vocab.txt, tokenizer_config.json) of ``path``, each None when absent."""
    if path.is_file():
        if path.name.endswith(".json"):
            return path, None, None
        return None, path, None
    if not path.is_dir():
        raise StageError(
            f"vocabulary {path} does not exist: give a vocab stage directory, a tokenizer directory or a vocab.txt"
        )
    if (path / ".inprogress.json").exists() and read_manifest(path) is None:
        raise StageError(
            f"{path} is an unfinished vocab stage (no {MANIFEST}): run `bertpipe vocab` to finish it"
        )
    tokenizer_json, vocab_txt, config = (
        path / n for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    )
    found = [p if p.exists() else None for p in (tokenizer_json, vocab_txt, config)]
    if found[0] is None and found[1] is None:
        raise StageError(f"{path} has neither tokenizer.json nor vocab.txt: it is not a vocabulary directory")
    return found[0], found[1], found[2]


def load_vocab(path: str | os.PathLike) -> Vocab:
    """Load a vocab stage directory, a Hugging Face tokenizer directory, a tokenizer.json or a vocab.txt.

    tokenizer.json is used when present (its normalizer decides the casing); otherwise a BERT tokenizer
    is built from vocab.txt, lowercasing as tokenizer_config.json's ``do_lower_case`` says or, for a bare
    vocab.txt, unless the vocabulary holds upper-case tokens.
    """
    path = Path(path)
    tokenizer_json, vocab_txt, config_json = _resolve_vocab_files(path)
    if tokenizer_json is not None:
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise StageError(f"{tokenizer_json} is not a valid tokenizer.json: {e}") from e
        lowercase = _normalizer_lowercases(
            json.loads(tokenizer_json.read_text(encoding="utf-8")).get("normalizer")
        )
        tokens = _tokens_of(tokenizer, tokenizer_json)
        where = tokenizer_json
    else:
        tokens = read_vocab_txt(vocab_txt)
        duplicates = (
            sorted({t for t in tokens if tokens.count(t) > 1}) if len(set(tokens)) != len(tokens) else []
        )
        if duplicates:
            raise StageError(
                f"{vocab_txt} lists these tokens twice: {duplicates[:10]}; each token needs one id"
            )
        lowercase = None
        where = vocab_txt
    if lowercase is None and config_json is not None:
        do_lower = json.loads(config_json.read_text(encoding="utf-8")).get("do_lower_case")
        lowercase = None if do_lower is None else bool(do_lower)
    if lowercase is None:  # a cased vocabulary has upper-case word pieces; an uncased one has none
        lowercase = not any(t not in SPECIAL_TOKENS and t != t.lower() for t in tokens)
    missing = [t for t in SPECIAL_TOKENS if t not in set(tokens)]
    if missing:
        raise StageError(
            f"vocabulary {where} lacks the special tokens {' '.join(missing)}: BERT needs all of "
            f"{' '.join(SPECIAL_TOKENS)}"
        )
    if tokenizer_json is None:
        tokenizer = bert_tokenizer({t: i for i, t in enumerate(tokens)}, lowercase)
    index = {t: i for i, t in enumerate(tokens)}
    special_ids = {SPECIAL_ID_NAMES[t]: index[t] for t in SPECIAL_TOKENS}
    # Callers ask for bare ids: no padding or truncation configured by whoever saved the tokenizer.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return Vocab(tokenizer, tokens, special_ids, lowercase, vocab_fingerprint(tokens))
