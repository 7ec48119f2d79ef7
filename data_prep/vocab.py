"""WordPiece vocabularies: load an existing one (vocab stage, HF tokenizer directory, vocab.txt) or train one.

Every vocabulary is used through a ``tokenizers.Tokenizer`` with BERT's normalizer, pre-tokenizer and
WordPiece model. ``load_vocab`` returns it with the special-token ids and the vocabulary fingerprint that
downstream stages record in their metadata.

Training is a pure function of the corpus and the settings, byte for byte. tokenizers' WordPiece (BPE) trainer
numbers the ``##`` forms of the alphabet in the iteration order of a hash map that is seeded anew for every
run, and breaks ties between merges of equal count by those ids, so left alone the order of vocab.txt and
even its token set change from run to run (``limit_alphabet`` ties too). ``train_tokenizer`` therefore counts
the corpus' words first (tokenizers' own counting), chooses the alphabet and its ``##`` forms from the counts
with ties broken by the character, and trains from those counts with these tokens registered in that order.

The alphabet covers every character of the train split by default (``character_coverage`` 1.0): BERT splits
Chinese and Japanese ideographs into one word each, so a character left out is an [UNK] wherever it occurs,
and a fixed cap (tokenizers' ``limit_alphabet`` of 1,000) drops real characters of such a script.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

    def output_config(self) -> dict:
        """The settings that decide the output: the stage fingerprint's config."""
        values = asdict(self)
        for key in ("corpus", "out", "force", "from_path"):
            values.pop(key)
        if self.from_path is not None:  # an adopted vocabulary: only its content matters (in the inputs)
            values = {"from": True}
        return values


def _part_files(corpus: Path, manifest: dict, split: str) -> list[Path]:
    return [corpus / f["path"] for f in manifest["files"] if f["path"].startswith(f"{split}/")]


def iter_sentence_batches(parts: list[Path]) -> Iterator[list[str]]:
    """The sentences of Parquet corpus parts, one list per record batch (memory bounded by the batch)."""
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=256, columns=["sentences"]):
            yield pc.list_flatten(batch.column(0)).to_pylist()


def corpus_word_counts(parts: list[Path], lowercase: bool) -> dict[str, int]:
    """How often each word (BERT-normalized and pre-tokenized) occurs in ``parts``, counted by tokenizers."""
    tokenizer = _bert_words(models.WordLevel(unk_token="[UNK]"), lowercase)
    trainer = trainers.WordLevelTrainer(vocab_size=1, show_progress=False)  # wanted: its counts, not a model
    tokenizer.train_from_iterator(iter_sentence_batches(parts), trainer)
    state = json.loads(trainer.__getstate__())
    try:
        return state["WordLevelTrainer"]["words"]
    except KeyError as e:  # the state is tokenizers' serde layout, not a documented API
        raise StageError(f"this tokenizers {tokenizers.__version__} keeps no word counts in a trainer") from e


def initial_tokens(
    word_counts: dict[str, int], limit_alphabet: int | None = None, character_coverage: float = 1.0
) -> tuple[list[str], list[str]]:
    """(alphabet, its ``##`` forms): the tokens WordPiece training starts from, each sorted.

    The alphabet is the fewest most frequent characters that cover ``character_coverage`` of all character
    occurrences (1.0: every character), at most ``limit_alphabet`` of them, ties broken by the character
    (the trainer breaks them in hash order); a ``##`` form exists for each of them that occurs inside a word.
    """
    char_counts: Counter[str] = Counter()
    inside: set[str] = set()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
        inside.update(word[1:])
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


def _repeated_words(word_counts: dict[str, int], batch_size: int = 1 << 16) -> Iterator[list[str]]:
    """Each word as often as it occurs, in lists of at most ``batch_size``: the counts as a trainer's feed."""
    batch: list[str] = []
    for word, count in word_counts.items():
        while count:
            take = min(count, batch_size - len(batch))
            batch += [word] * take
            count -= take
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def train_tokenizer(parts: list[Path], config: VocabConfig) -> tokenizers.Tokenizer:
    """WordPiece trained on ``parts``, as a BERT tokenizer; the same on every run.

    Ids: special tokens 0..4, the alphabet, its ``##`` forms, then the trainer's merges in merge order.
    """
    word_counts = corpus_word_counts(parts, config.lowercase)
    alphabet, continuing = initial_tokens(word_counts, config.limit_alphabet, config.character_coverage)
    log.info("vocab: an alphabet of %d characters (%d ## forms)", len(alphabet), len(continuing))
    initial = [*SPECIAL_TOKENS, *alphabet, *continuing]
    trainer = trainers.WordPieceTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=initial,  # registered first, in this order: ids no longer follow hash-map order
        limit_alphabet=len(alphabet),  # initial_alphabet always survives the limit: exactly this alphabet
        initial_alphabet=alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    # The trainer is fed the counted words, one per sequence with no normalizer or pre-tokenizer: the same
    # counts as a second pass over the text, at a fraction of its cost (normalizing is most of the time).
    trained = tokenizers.Tokenizer(_wordpiece())
    trained.train_from_iterator(_repeated_words(word_counts), trainer)
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

    if adopted is None:
        train_parts = _part_files(corpus, corpus_manifest, "train")
        log.info(
            "vocab: training WordPiece (%d tokens) on %d train shards", config.vocab_size, len(train_parts)
        )
        tokenizer = train_tokenizer(train_parts, config)
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
