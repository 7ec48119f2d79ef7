"""WordPiece vocabularies: load an existing one (vocab stage, HF tokenizer directory, vocab.txt) or train one.

Every vocabulary is used through a ``tokenizers.Tokenizer`` with BERT's normalizer, pre-tokenizer and
WordPiece model. ``load_vocab`` returns it with the special-token ids and the vocabulary fingerprint that
downstream stages record in their metadata.

Training is a pure function of the corpus and the settings, byte for byte. tokenizers' WordPiece (BPE) trainer
numbers the ``##`` forms of the alphabet in the iteration order of a hash map that is seeded anew for every
run, and breaks ties between merges of equal count by those ids, so left alone the order of vocab.txt and
even its token set change from run to run (``limit_alphabet`` ties too). ``train_tokenizer`` therefore
chooses the alphabet and its ``##`` forms first, with ties broken by the character, and registers them in
that order before the trainer numbers anything. They come from a character scan (``scan_characters``:
numpy over the code points, a few percent of the training time): each distinct code point is passed once
through the tokenizer's own normalizer and pre-tokenizer, which tells what it becomes and whether it can
continue a word, so the scan's counts are exactly those of the trainer's words. The trainer then reads the
text once (tokenizers' own normalizing, pre-tokenizing and counting, in Rust, as its own
``train_from_iterator`` does): one pass over the text in Rust, not two.

``sample_bytes`` trains on a deterministic sample of the train split's documents, chosen by content hash
(``doc_id``, itself a hash of the text) as SentencePiece's ``input_sentence_size`` samples sentences: the
same documents whatever the shard count, worker count or run.

The alphabet covers every character of the train split by default (``character_coverage`` 1.0): BERT splits
Chinese and Japanese ideographs into one word each, so a character left out is an [UNK] wherever it occurs,
and a fixed cap (tokenizers' ``limit_alphabet`` of 1,000) drops real characters of such a script.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from data_prep.cjk import count_words
from data_prep.manifest import (
    MANIFEST,
    StageError,
    atomic_path,
    begin_stage,
    file_entry,
    fingerprint,
    read_manifest,
    require_complete,
    stage_fingerprint,
    verify_source,
    write_json_atomic,
)
from data_prep.schema import SPECIAL_ID_NAMES, SPECIAL_TOKENS, vocab_fingerprint

log = logging.getLogger(__name__)

MAX_INPUT_CHARS_PER_WORD = 100  # BERT's limit: a longer "word" becomes a single [UNK]
STAGE = "vocab"
FORMAT_VERSION = 2  # 2: deterministic training (the ## forms sorted after the alphabet)
MODEL_MAX_LENGTH = 512
STATS_MAX_SENTENCES = 200_000  # UNK rate and tokens/word are measured on at most this many sentences
SCAN_BLOCK_CHARS = 1 << 21  # the character scan works on ~2M code points (~30 MB of arrays) at a time
NUM_CODE_POINTS = 0x110000
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)  # what a tokenizer directory may hold: copied with a model


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
        """Number of ids."""
        return len(self.tokens)


def _bert_words(model: models.Model, lowercase: bool) -> tokenizers.Tokenizer:
    """A tokenizer over ``model`` that splits text into words as BERT does (normalizer and pre-tokenizer)."""
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _wordpiece(vocab: dict[str, int] | None = None) -> models.WordPiece:
    return models.WordPiece(
        vocab,
        unk_token="[UNK]",
        continuing_subword_prefix="##",
        max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
    )


def bert_tokenizer(vocab: dict[str, int], lowercase: bool) -> tokenizers.Tokenizer:
    """A BERT WordPiece tokenizer (normalizer, pre-tokenizer, post-processor, decoder) over ``vocab``."""
    tokenizer = _bert_words(_wordpiece(vocab), lowercase)
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
    try:
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n").rstrip("\r") for line in f]
    except UnicodeDecodeError as e:
        raise StageError(
            f"{path} is not a UTF-8 vocab.txt ({e.reason} at byte {e.start}): give a BERT vocab.txt"
        ) from None
    while tokens and tokens[-1] == "":  # a trailing newline is not a token
        tokens.pop()
    return tokens


def write_vocab_txt(path: str | os.PathLike, tokens: list[str]) -> None:
    """Write tokens one per line in id order (BERT's vocab.txt)."""
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
    verify_source(path)  # a stage's vocabulary must be the one its manifest lists, byte for byte
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


# --- the vocab stage ---------------------------------------------------------------------------------------


@dataclass
class VocabConfig:
    """How to build the WordPiece vocabulary of a corpus (or adopt an existing one)."""

    corpus: str
    """A finished shard stage directory; training reads its train split, stats its valid split."""
    out: str
    """The stage directory to write."""
    vocab_size: int = 30522
    """Target size including the special tokens (the trainer may stop short on a small corpus)."""
    lowercase: bool = True
    """Uncased (lowercase and strip accents, as bert-base-uncased) or cased."""
    min_frequency: int = 2
    """A merge must occur at least this often in the corpus."""
    character_coverage: float = 1.0
    """Share of the train split's character occurrences the alphabet covers, most frequent characters first
    (SentencePiece's ``character_coverage``). 1.0: every character seen in training, which Chinese or Japanese
    (thousands of characters, each missing one an [UNK]) need; a noisy web corpus may pass e.g. 0.9999 to
    leave its rarest symbols out of the alphabet."""
    limit_alphabet: int | None = None
    """At most this many characters (the most frequent) become tokens, rarer ones map to [UNK]; None: no cap
    beyond ``character_coverage``."""
    sample_bytes: int | None = None
    """Train on about this many bytes of the train split's text: the documents whose content hash falls in
    the first ``sample_bytes / train bytes`` of the hash range (deterministic; SentencePiece's
    ``input_sentence_size``). None, or more than the split holds: every document."""
    max_words: int | None = None
    """Train on at most this many distinct words: the trainer's memory grows with the distinct words it
    holds (about a kilobyte each), and a large corpus has millions that occur once or twice. The words are
    counted first (in Rust), the rarest count classes dropped whole until at most this many remain (so no tie
    is broken arbitrarily), and the trainer is fed the kept words' counts; the alphabet still comes from every
    word. None: every word, read in one pass."""
    from_path: str | None = None
    """Adopt this vocab.txt or tokenizer directory instead of training (lowercase then comes from it)."""
    force: bool = field(default=False, repr=False)
    """Rebuild even when a finished stage with the same fingerprint exists."""

    def __post_init__(self) -> None:
        self.corpus, self.out = str(self.corpus), str(self.out)
        self.from_path = None if self.from_path is None else str(self.from_path)
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size {self.vocab_size} leaves no room beside the {len(SPECIAL_TOKENS)} special tokens: "
                "pass --vocab-size in the thousands (BERT uses 30522)"
            )
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {self.min_frequency}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(
                f"character_coverage must be in (0, 1], got {self.character_coverage}: 1.0 keeps every "
                "character of the train split, e.g. 0.9999 leaves out the rarest 0.01% of occurrences"
            )
        if self.limit_alphabet is not None and self.limit_alphabet < 1:
            raise ValueError(
                f"limit_alphabet must be at least 1 (or None: no cap), got {self.limit_alphabet}"
            )
        if self.max_words is not None and self.max_words < 1:
            raise ValueError(
                f"max_words must be at least 1 (or None: every word), got {self.max_words}: "
                "e.g. --max-words 1000000 keeps the million most frequent words"
            )
        if self.sample_bytes is not None and self.sample_bytes < 1:
            raise ValueError(
                f"sample_bytes must be at least 1 (or None: the whole train split), got {self.sample_bytes}: "
                "e.g. --sample-bytes 2000000000 trains on ~2 GB of the text"
            )

    def output_config(self) -> dict:
        """The settings that decide the output: the stage fingerprint's config."""
        values = asdict(self)
        for key in ("corpus", "out", "force", "from_path"):
            values.pop(key)
        for key in ("sample_bytes", "max_words"):
            if values[key] is None:  # stages written before the option keep their fingerprint
                values.pop(key)
        if self.from_path is not None:  # an adopted vocabulary: only its content matters (in the inputs)
            values = {"from": True}
        return values


def _part_files(corpus: Path, manifest: dict, split: str) -> list[Path]:
    return [corpus / f["path"] for f in manifest["files"] if f["path"].startswith(f"{split}/")]


def iter_sentence_batches(parts: list[Path], keep_below: int | None = None) -> Iterator[list[str]]:
    """The sentences of Parquet corpus parts, one list per record batch (memory bounded by the batch).

    ``keep_below``: only the documents whose ``doc_id`` (a content hash) is below it (``sample_cutoff``).
    """
    columns = ["sentences"] if keep_below is None else ["doc_id", "sentences"]
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=256, columns=columns):
            if keep_below is not None:
                batch = batch.filter(pc.less(batch.column(0), keep_below))
            yield pc.list_flatten(batch.column(batch.num_columns - 1)).to_pylist()


def sample_cutoff(sample_bytes: int | None, split_bytes: int) -> int | None:
    """The ``doc_id`` bound that keeps about ``sample_bytes`` of a split of ``split_bytes``; None: keep all.

    ``doc_id`` is 63 bits of a content hash, uniform over documents, so a bound at fraction f of its range
    keeps a share f of the documents, and of the bytes on average, whatever their order or shard.
    """
    if sample_bytes is None or sample_bytes >= split_bytes:
        return None
    return int(sample_bytes / split_bytes * 2**63)


def corpus_word_counts(parts: list[Path], lowercase: bool, keep_below: int | None = None) -> dict[str, int]:
    """How often each word (BERT-normalized and pre-tokenized) occurs in ``parts`` (the documents with
    ``doc_id`` below ``keep_below``), counted by tokenizers."""
    tokenizer = _bert_words(models.WordLevel(unk_token="[UNK]"), lowercase)
    trainer = trainers.WordLevelTrainer(vocab_size=1, show_progress=False)  # wanted: its counts, not a model
    tokenizer.train_from_iterator(iter_sentence_batches(parts, keep_below), trainer)
    state = json.loads(trainer.__getstate__())
    del trainer, tokenizer
    try:
        return state["WordLevelTrainer"]["words"]
    except KeyError as e:  # the state is tokenizers' serde layout, not a documented API
        raise StageError(f"this tokenizers {tokenizers.__version__} keeps no word counts in a trainer") from e


def most_frequent_words(word_counts: dict[str, int], max_words: int) -> dict[str, int]:
    """The words of the count classes above the rarest ones dropped whole, so that at most ``max_words``
    remain (every word if they already fit): no tie between equally frequent words decides what stays."""
    if len(word_counts) <= max_words:
        return word_counts
    words_per_count = Counter(word_counts.values())
    kept = 0
    threshold = max(words_per_count) + 1
    for count in sorted(words_per_count, reverse=True):
        if kept + words_per_count[count] > max_words:
            break
        kept += words_per_count[count]
        threshold = count
    return {word: count for word, count in word_counts.items() if count >= threshold}


def choose_alphabet(
    char_counts: dict[str, int],
    inside: set[str],
    limit_alphabet: int | None = None,
    character_coverage: float = 1.0,
) -> tuple[list[str], list[str]]:
    """(alphabet, its ``##`` forms) from the words' character counts and the characters seen inside a word.

    The alphabet is the fewest most frequent characters that cover ``character_coverage`` of all character
    occurrences (1.0: every character), at most ``limit_alphabet`` of them, ties broken by the character
    (the trainer breaks them in hash order); a ``##`` form exists for each of them in ``inside``.
    """
    by_frequency = sorted(char_counts, key=lambda char: (-char_counts[char], char))
    needed = character_coverage * sum(char_counts.values())
    covered = num_chars = 0
    while num_chars < len(by_frequency) and covered < needed:
        covered += char_counts[by_frequency[num_chars]]
        num_chars += 1
    if limit_alphabet is not None:
        num_chars = min(num_chars, limit_alphabet)
    alphabet = sorted(by_frequency[:num_chars])
    return alphabet, [f"##{char}" for char in alphabet if char in inside]


def initial_tokens(
    word_counts: dict[str, int], limit_alphabet: int | None = None, character_coverage: float = 1.0
) -> tuple[list[str], list[str]]:
    """(alphabet, its ``##`` forms) of counted words: ``choose_alphabet`` over their characters, each sorted."""
    char_counts: Counter[str] = Counter()
    inside: set[str] = set()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
        inside.update(word[1:])
    return choose_alphabet(char_counts, inside, limit_alphabet, character_coverage)


_REMOVED, _SPACE, _ALONE, _WORD = range(4)  # what BERT's normalizer and pre-tokenizer make of a code point


@dataclass
class CharacterScan:
    """The characters of a corpus' words, as the trainer will see them."""

    char_counts: dict[str, int]  # occurrences of each character in the words
    inside: set[str]  # characters that occur after the first character of a word (they need a ## form)


class _CodePoints:
    """What BERT's normalizer and pre-tokenizer make of each code point, asked of tokenizers once per point."""

    def __init__(self, lowercase: bool) -> None:
        words = _bert_words(models.WordLevel(unk_token="[UNK]"), lowercase)
        self._normalizer, self._pre_tokenizer = words.normalizer, words.pre_tokenizer
        self.kind = np.zeros(NUM_CODE_POINTS, np.uint8)  # _REMOVED until classified (known says whether)
        self.known = np.zeros(NUM_CODE_POINTS, bool)
        self.chars: dict[int, tuple[str, str]] = {}  # point -> (characters it leaves in words, first one)

    def classify(self, points: np.ndarray) -> None:
        """Learn the kind of each of ``points`` not seen before."""
        for point in points[~self.known[points]].tolist():
            normalized = self._normalizer.normalize_str(chr(point))
            pieces = self._pre_tokenizer.pre_tokenize_str(normalized)
            word_chars = "".join(piece for piece, _ in pieces)
            if not normalized:
                kind = _REMOVED
            elif not pieces:
                kind = _SPACE
            elif len(self._pre_tokenizer.pre_tokenize_str(f"x{normalized}x")) == 1:
                kind = _WORD  # it joins the letters around it into one word
            else:
                kind = _ALONE  # punctuation, CJK: a word of its own
            self.kind[point], self.known[point] = kind, True
            # characters after the first within its own pieces are inside a word wherever the point occurs
            tail = "".join(piece[1:] for piece, _ in pieces)
            self.chars[point] = (word_chars, tail)


def scan_characters(batches: Iterator[list[str]], lowercase: bool) -> CharacterScan:
    """Count the characters BERT's normalizer and pre-tokenizer leave in the words of ``batches`` (sentence
    lists), and find those that occur inside a word, with numpy over the code points.

    A character continues a word when it is a word character and the nearest code point before it that
    the normalizer keeps is one too, within the sentence; normalizing is per code point (clean-up, NFD and
    accent stripping, lowercasing, CJK padding), so this equals counting the trainer's words.
    """
    points = _CodePoints(lowercase)
    counts = np.zeros(NUM_CODE_POINTS, np.int64)
    continues = np.zeros(NUM_CODE_POINTS, bool)  # the point's first character follows a word character

    def scan(block: list[str]) -> None:
        codes = np.frombuffer("\n".join(block).encode("utf-32-le"), "<u4")
        block_counts = np.bincount(codes, minlength=NUM_CODE_POINTS)
        points.classify(np.flatnonzero(block_counts))
        counts[:] += block_counts
        kinds = points.kind[codes]
        kept = kinds != _REMOVED  # "a\x00b" is one word: the normalizer drops the NUL
        codes, kinds = codes[kept], kinds[kept]
        after_word = (kinds[1:] == _WORD) & (kinds[:-1] == _WORD)
        continues[codes[1:][after_word]] = True

    block: list[str] = []
    size = 0
    for sentences in batches:
        block += sentences
        size += sum(map(len, sentences))
        if size >= SCAN_BLOCK_CHARS:
            scan(block)
            block, size = [], 0
    if block:
        scan(block)
    char_counts: Counter[str] = Counter()
    inside: set[str] = set()
    for point in np.flatnonzero(counts).tolist():
        word_chars, tail = points.chars[point]
        for char in word_chars:
            char_counts[char] += int(counts[point])
        inside.update(tail)
        if continues[point] and word_chars:
            inside.add(word_chars[0])
    return CharacterScan(dict(char_counts), inside)


def _release_freed_memory() -> None:
    """Hand memory freed by Arrow's allocator and glibc's heap back to the system (best effort)."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def train_tokenizer(
    parts: list[Path], config: VocabConfig, keep_below: int | None = None
) -> tokenizers.Tokenizer:
    """WordPiece trained on ``parts`` (the documents with ``doc_id`` below ``keep_below``), as a BERT
    tokenizer; the same on every run.

    Ids: special tokens 0..4, the alphabet, its ``##`` forms, then the trainer's merges in merge order.
    """
    if config.max_words is not None:
        return _train_on_counted_words(parts, config, keep_below)
    started = time.perf_counter()
    scan = scan_characters(iter_sentence_batches(parts, keep_below), config.lowercase)
    alphabet, continuing = choose_alphabet(
        scan.char_counts, scan.inside, config.limit_alphabet, config.character_coverage
    )
    log.info(
        "vocab: an alphabet of %d characters (%d ## forms), scanned in %.1f s",
        len(alphabet),
        len(continuing),
        time.perf_counter() - started,
    )
    _release_freed_memory()  # the trainer reads on its own threads: what the scan freed would stay mapped
    initial = [*SPECIAL_TOKENS, *alphabet, *continuing]
    trained = _bert_words(_wordpiece(), config.lowercase)  # the one pass over the text, in Rust
    trained.train_from_iterator(
        iter_sentence_batches(parts, keep_below), _wordpiece_trainer(initial, alphabet, config)
    )
    return _finish_training(trained, initial, config, parts)


def _wordpiece_trainer(initial: list[str], alphabet: list[str], config: VocabConfig) -> trainers.Trainer:
    """tokenizers' WordPiece trainer with the ``initial`` tokens (special, alphabet, ``##`` forms) fixed."""
    return trainers.WordPieceTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=initial,  # registered first, in this order: ids no longer follow hash-map order
        limit_alphabet=len(alphabet),  # initial_alphabet always survives the limit: exactly this alphabet
        initial_alphabet=alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )


def _train_on_counted_words(
    parts: list[Path], config: VocabConfig, keep_below: int | None
) -> tokenizers.Tokenizer:
    """``train_tokenizer`` with ``max_words``: count the words (one pass over the text, in Rust), choose the
    alphabet from all of them, then feed the trainer only the most frequent words, each as often as it
    occurs. With every word kept this trains exactly what the one-pass path trains (tested)."""
    started = time.perf_counter()
    counts = corpus_word_counts(parts, config.lowercase, keep_below)
    alphabet, continuing = initial_tokens(counts, config.limit_alphabet, config.character_coverage)
    kept = most_frequent_words(counts, config.max_words)
    log.info(
        "vocab: %d distinct words, %d kept (max_words %d), an alphabet of %d characters, counted in %.1f s",
        len(counts), len(kept), config.max_words, len(alphabet), time.perf_counter() - started,
    )  # fmt: skip
    del counts
    _release_freed_memory()
    initial = [*SPECIAL_TOKENS, *alphabet, *continuing]
    trained = tokenizers.Tokenizer(_wordpiece())  # no normalizer or pre-tokenizer: each string is one word
    trained.train_from_iterator(
        ([word] * count for word, count in kept.items()), _wordpiece_trainer(initial, alphabet, config)
    )
    return _finish_training(trained, initial, config, parts)


def _finish_training(
    trained: tokenizers.Tokenizer, initial: list[str], config: VocabConfig, parts: list[Path]
) -> tokenizers.Tokenizer:
    """The trained vocabulary checked (size, the initial tokens first) and rebuilt as a BERT tokenizer."""
    size = trained.get_vocab_size()
    if size > config.vocab_size:
        raise StageError(
            f"--vocab-size {config.vocab_size} is smaller than the {len(SPECIAL_TOKENS)} special tokens plus the "
            f"corpus alphabet (with ## forms): {size} tokens are needed; pass --vocab-size {size} or more, or "
            "leave the rarest characters out with a character_coverage below 1 (e.g. 0.9999)"
        )
    tokens = _tokens_of(trained, parts[0].parent if parts else Path("."))
    assert tokens[: len(initial)] == initial, (tokens[:10], initial[:10])
    # Rebuilt from the vocabulary: the trained tokenizer would match the alphabet as added special tokens.
    return bert_tokenizer({token: i for i, token in enumerate(tokens)}, config.lowercase)


def vocab_stats(vocab: Vocab, parts: list[Path], max_sentences: int = STATS_MAX_SENTENCES) -> dict:
    """UNK rate and tokens per word (``data_prep.cjk.count_words``: a CJK character is a word) over ``parts``,
    at most ``max_sentences`` sentences."""
    num_sentences = num_words = num_cjk = num_tokens = num_unk = 0
    unk = vocab.special_ids["unk"]
    for sentences in iter_sentence_batches(parts):
        sentences = sentences[: max_sentences - num_sentences]
        for encoding in vocab.tokenizer.encode_batch(sentences, add_special_tokens=False):
            num_tokens += len(encoding.ids)
            num_unk += encoding.ids.count(unk)
        for sentence in sentences:
            words, cjk = count_words(sentence)
            num_words += words
            num_cjk += cjk
        num_sentences += len(sentences)
        if num_sentences >= max_sentences:
            break
    return {
        "sentences": num_sentences,
        "words": num_words,
        "cjk_characters": num_cjk,
        "tokens": num_tokens,
        "unk_tokens": num_unk,
        "unk_rate": num_unk / num_tokens if num_tokens else 0.0,
        "tokens_per_word": num_tokens / num_words if num_words else 0.0,
    }


def _write_outputs(directory: Path, vocab: Vocab) -> None:
    with atomic_path(directory / "tokenizer.json") as tmp:
        vocab.tokenizer.save(str(tmp))
    with atomic_path(directory / "vocab.txt") as tmp:
        write_vocab_txt(tmp, vocab.tokens)
    special = {f"{name}_token": token for token, name in SPECIAL_ID_NAMES.items()}
    write_json_atomic(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": vocab.lowercase,
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "model_max_length": MODEL_MAX_LENGTH,
            **special,
        },
    )
    write_json_atomic(directory / "special_tokens_map.json", special)


def _stage_inputs(config: VocabConfig) -> tuple[dict, dict[str, str], Vocab | None]:
    """(the corpus manifest, the inputs' fingerprints, the adopted vocabulary or None)."""
    corpus_manifest = require_complete(Path(config.corpus), "shard")
    inputs = {"corpus": corpus_manifest["fingerprint"]}
    adopted = None
    if config.from_path is not None:
        adopted = load_vocab(config.from_path)
        inputs["from"] = fingerprint(adopted.tokenizer.to_str())
    return corpus_manifest, inputs, adopted


def expected_fingerprint(config: VocabConfig) -> str:
    """The fingerprint the stage directory will have, computed before any training (the corpus must exist)."""
    _, inputs, _ = _stage_inputs(config)
    return stage_fingerprint(STAGE, config.output_config(), inputs, FORMAT_VERSION)


def train_vocab(config: VocabConfig) -> dict:
    """Run the vocab stage (train WordPiece, or adopt ``from_path``), or find it done; return the manifest."""
    corpus = Path(config.corpus)
    corpus_manifest, inputs, adopted = _stage_inputs(config)
    stage = begin_stage(config.out, STAGE, config.output_config(), inputs, FORMAT_VERSION, force=config.force)
    if stage.complete:
        log.info("vocab: %s is already complete for this configuration and corpus; nothing to do", config.out)
        return read_manifest(config.out)

    keep_below = None
    if adopted is None:
        train_parts = _part_files(corpus, corpus_manifest, "train")
        train_bytes = corpus_manifest["stats"]["splits"]["train"]["bytes"]
        keep_below = sample_cutoff(config.sample_bytes, train_bytes)
        log.info(
            "vocab: training WordPiece (%d tokens) on %d train shards (%s)",
            config.vocab_size,
            len(train_parts),
            "all documents" if keep_below is None else f"a {config.sample_bytes / train_bytes:.2%} sample",
        )
        tokenizer = train_tokenizer(train_parts, config, keep_below)
        tokens = _tokens_of(tokenizer, corpus)
        assert tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS), tokens[:5]
        vocab = Vocab(
            tokenizer,
            tokens,
            {SPECIAL_ID_NAMES[t]: i for i, t in enumerate(SPECIAL_TOKENS)},
            config.lowercase,
            vocab_fingerprint(tokens),
        )
    else:
        vocab = adopted
        log.info("vocab: adopting %s (%d tokens)", config.from_path, len(vocab.tokens))
    _write_outputs(stage.directory, vocab)

    stats_split = "valid"
    parts = [p for p in _part_files(corpus, corpus_manifest, "valid") if pq.ParquetFile(p).metadata.num_rows]
    if not parts:  # no valid documents (e.g. --valid-fraction 0): measure on the train split instead
        stats_split, parts = "train", _part_files(corpus, corpus_manifest, "train")
    stats = {
        "vocab_size": len(vocab.tokens),
        "lowercase": vocab.lowercase,
        "special_ids": vocab.special_ids,
        "vocab_fingerprint": vocab.fingerprint,
        "alphabet_size": sum(1 for t in vocab.tokens if len(t) == 1),  # no merge makes a single character
        "source": config.from_path or "trained",
        "train_sample_fraction": 1.0 if keep_below is None else keep_below / 2**63,
        "stats_split": stats_split,
        **vocab_stats(vocab, parts),
    }
    if adopted is None and len(vocab.tokens) < config.vocab_size:
        stats["requested_vocab_size"] = config.vocab_size
        log.warning(
            "vocab: asked for %d tokens, the corpus gives %d: no more merges occur at least %d times "
            "(a smaller --vocab-size or --min-frequency, or a larger corpus)",
            config.vocab_size, len(vocab.tokens), config.min_frequency,
        )  # fmt: skip
    log.info(
        "vocab: %d tokens; on the %s split: UNK rate %.4f%%, %.3f tokens per word",
        stats["vocab_size"],
        stats_split,
        100 * stats["unk_rate"],
        stats["tokens_per_word"],
    )
    files = [file_entry(stage.directory, name) for name in TOKENIZER_FILES]
    files[0]["rows"] = len(vocab.tokens)  # vocab.txt: one token per line
    return stage.commit(files, stats)
