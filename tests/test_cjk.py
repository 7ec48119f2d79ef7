"""Chinese and Japanese text through shard, vocab and examples, on the shared Chinese corpus (issue 11)."""

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.cjk import count_words, decode_wordpieces, join_lines, split_cjk_sentences
from data_prep.sentences import chunk_on_whitespace, split_sentences
from data_prep.shard import ShardConfig, shard_corpus
from data_prep.textio import paragraphs_of
from data_prep.vocab import VocabConfig, corpus_word_counts, initial_tokens, load_vocab, train_vocab

HAN = "[\u4e00-\u9fff]"
HAN_SPACE_HAN = re.compile(f"{HAN} {HAN}")
CJK_CLOSERS = "」』”’）】》"
CLOSERS = CJK_CLOSERS + "\"')"
MIXED = (
    "BERT 是一个双向\n编码器。It was released by Google\nin 2018. 它使用 WordPiece\n分词！研究者称它为“预训练\n模型”。\n\n"
    "今日は晴れです。明日は雨\nでしょう。"
)


@pytest.fixture(scope="module")
def zh_stages(shared_data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(shard stage, vocab stage, raw texts) of the whole Chinese corpus, as the issue ran it but with 5% of
    the documents for validation (~250, not ~40: a steadier UNK rate) (~4 s)."""
    source = shared_data / "corpus_zh" / "fortunes-zh.jsonl"
    root = tmp_path_factory.mktemp("zh")
    shard_corpus(
        ShardConfig(
            inputs=[str(source)], out=root / "shard", num_shards=2, language="zh", valid_fraction=0.05
        )
    )
    train_vocab(VocabConfig(corpus=root / "shard", out=root / "vocab", vocab_size=8000))
    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    return root / "shard", root / "vocab", texts


def _parts(stage: Path, split: str) -> list[Path]:
    return sorted((stage / split).glob("*.parquet"))


def _sentences(stage: Path, splits=("train", "valid")) -> list[str]:
    return [
        sentence
        for split in splits
        for part in _parts(stage, split)
        for document in pq.read_table(part).column("sentences").to_pylist()
        for sentence in document
    ]


def test_wrapped_chinese_lines_join_without_a_space(zh_stages):
    shard, _, texts = zh_stages
    sentences = _sentences(shard)
    text = "\n".join(sentences)
    for joined in ("难以合作的人", "控制字符", "多用途邮件"):  # the examples, once split by a space
        assert joined in text
    # A space between two ideographs is left only where the raw text has whitespace besides a line break:
    # inside a line, or an ideographic space ending one (a verse separator).
    gaps = (m for t in texts for m in re.finditer(f"({HAN})(\\s+)({HAN})", t))
    written = {f"{m[1]} {m[3]}" for m in gaps if re.fullmatch(r"[ \t\xa0]*\n\s*", m[2]) is None}
    spaced = [m.group() for s in sentences for m in HAN_SPACE_HAN.finditer(s)]
    assert set(spaced) <= written
    assert sum(1 for s in sentences if HAN_SPACE_HAN.search(s)) < 150  # 1,437 sentences before the fix


def test_chinese_sentences_end_at_full_stops_with_their_closing_quotes(zh_stages):
    shard, _, _ = zh_stages
    sentences = _sentences(shard)
    assert "Ctrl-D 也可以简写为 ^D。" in sentences  # sentencex kept it with the next one (a stray quote)
    assert any(s.startswith("或者，你也可以键入") for s in sentences)
    # No sentence goes on after 。！？ and its closing quotes and brackets ...
    inner_end = re.compile(f"[。！？][{CLOSERS}]*+(?=[^{CLOSERS}，、；：,;:\\s])")
    assert [s for s in sentences if inner_end.search(s)] == []
    # ... and none starts with the closing quote of the one before.
    assert [s for s in sentences if s[0] in CJK_CLOSERS] == []


def test_sentence_ends_and_quotes_on_examples():
    assert split_cjk_sentences("他说：“你好。”然后走了。“走吧！”，他说。真的吗？！是的!好。") == [
        "他说：“你好。”",
        "然后走了。",
        "“走吧！”，他说。",
        "真的吗？！",
        "是的!",
        "好。",
    ]
    assert split_cjk_sentences("《忽然想到．七》何不试之以足? ”下文") == [
        "《忽然想到．七》何不试之以足? ”",
        "下文",
    ]
    assert split_cjk_sentences("English. Stays whole! Here") == ["English. Stays whole! Here"]


def test_mixed_chinese_english_and_japanese_text():
    paragraphs = paragraphs_of(MIXED)
    assert paragraphs == [
        "BERT 是一个双向编码器。It was released by Google in 2018. 它使用 WordPiece 分词！研究者称它为“预训练模型”。",
        "今日は晴れです。明日は雨でしょう。",
    ]
    assert join_lines(["Latin words", "join with a space", "改进 Debian", "这一目标", "中文", "English"]) == (
        "Latin words join with a space 改进 Debian 这一目标中文 English"
    )
    for language in ("zh", "en", "ja"):
        sentences = [s for p in paragraphs for s in split_sentences(p, language, 2000, Counter())]
        assert sentences == [
            "BERT 是一个双向编码器。",
            "It was released by Google in 2018.",
            "它使用 WordPiece 分词！",
            "研究者称它为“预训练模型”。",
            "今日は晴れです。",
            "明日は雨でしょう。",
        ]
    # ideographs and kana count one word each; Latin runs by spaces, punctuation alone is no word
    assert count_words(paragraphs[0]) == (24 + 9, 24)  # 8+3+2+6+5 CJK; BERT, It ... 2018., WordPiece
    assert count_words("今日は晴れです。") == (7, 7)
    assert count_words("Hello, world — ok") == (3, 0)


def test_long_chinese_text_without_spaces_is_cut_after_clause_punctuation():
    text = "一二三四五，六七八九十一二，三四五六七八九"
    assert chunk_on_whitespace(text, 16) == ["一二三四五，六七八九十一二，", "三四五六七八九"]
    assert all(len(p) <= 8 for p in chunk_on_whitespace("汉" * 20, 8))


def test_shard_counts_words_as_characters_for_chinese(zh_stages):
    shard, _, _ = zh_stages
    stats = json.loads((shard / "manifest.json").read_text())["stats"]
    counted = [count_words(s) for s in _sentences(shard)]
    assert stats["words"] == sum(w for w, _ in counted)  # pyarrow's count agrees with the Python one
    assert stats["cjk_characters"] == sum(c for _, c in counted)
    # ~950k characters: ~300k ideographs, against 76,762 whitespace "words" before
    assert 280_000 < stats["cjk_characters"] < stats["words"] < 400_000
    split_total = sum(stats["splits"][s]["cjk_characters"] for s in ("train", "valid"))
    assert split_total == stats["cjk_characters"]


def test_vocabulary_covers_every_train_character_and_unk_comes_only_from_unseen_ones(zh_stages):
    shard, vocab_dir, _ = zh_stages
    stats = json.loads((vocab_dir / "manifest.json").read_text())["stats"]
    vocab = load_vocab(vocab_dir)
    assert stats["vocab_size"] == 8000 and stats["stats_split"] == "valid"
    train_chars = {c for word in corpus_word_counts(_parts(shard, "train"), lowercase=True) for c in word}
    assert train_chars <= set(vocab.tokens)  # 5,902 characters; tokenizers' default limit kept 1,000
    # Every [UNK] of the valid split is a word holding a character never seen in training.
    valid_words = [
        word
        for sentence in _sentences(shard, ("valid",))
        for word, _ in vocab.tokenizer.pre_tokenizer.pre_tokenize_str(
            vocab.tokenizer.normalizer.normalize_str(sentence)
        )
    ]
    unseen = [w for w in valid_words if set(w) - train_chars]
    assert stats["unk_tokens"] == len(unseen) > 0
    assert (
        stats["unk_rate"] < 0.01
    )  # 0.44% of tokens here (0.64% of the valid ideographs are unseen); 9.7% before
    assert stats["cjk_characters"] > 0.9 * stats["words"]
    assert 1.0 < stats["tokens_per_word"] < 2.0  # a character is a token; 8.4 "per word" by whitespace


def test_character_coverage_and_limit_choose_the_alphabet():
    counts = {"a": 90, "b": 6, "c": 3, "d": 1}  # 100 character occurrences
    assert initial_tokens(counts)[0] == ["a", "b", "c", "d"]  # 1.0: every character
    assert initial_tokens(counts, character_coverage=0.99)[0] == ["a", "b", "c"]
    assert initial_tokens(counts, character_coverage=0.95)[0] == ["a", "b"]
    assert initial_tokens(counts, limit_alphabet=1)[0] == ["a"]
    with pytest.raises(ValueError, match="character_coverage"):
        VocabConfig(corpus="c", out="o", character_coverage=0)


def test_wordpieces_decode_without_spaces_between_chinese_characters(zh_stages):
    _, vocab_dir, _ = zh_stages
    vocab = load_vocab(vocab_dir)
    text = "在 Debian 这种规模的项目中，很难避免 embeddings。"
    tokens = vocab.tokenizer.encode(text, add_special_tokens=False).tokens
    assert " ".join(tokens).startswith("在 debian 这 种 规 模 的 项 目 中 ， 很 难")
    assert decode_wordpieces(tokens) == "在 debian 这种规模的项目中，很难避免 embeddings。"
    assert decode_wordpieces(["[CLS]", "你", "[MASK]", "。", "[SEP]"]) == "[CLS] 你 [MASK] 。 [SEP]"


def test_examples_data_card_shows_a_decoded_chinese_example(zh_stages, shared_data, tmp_path):
    from data_prep.examples_stage import ExamplesConfig, generate_examples

    _, vocab_dir, _ = zh_stages
    lines = (shared_data / "corpus_zh" / "fortunes-zh.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "slice.jsonl").write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    corpus = tmp_path / "shard"
    shard_corpus(ShardConfig(inputs=[str(tmp_path / "slice.jsonl")], out=corpus, num_shards=1, language="zh"))
    manifest = generate_examples(
        ExamplesConfig(
            corpus=corpus, vocab=vocab_dir, out=tmp_path / "ex", max_seq_length=64, masking="dynamic"
        )
    )
    example = manifest["stats"]["example"]
    assert example["tokens"].startswith("[CLS] ")  # the token view keeps one space per token
    text = example["text"]
    assert text.startswith("[CLS] ") and text.endswith(" [SEP]") and text.count("[SEP]") == 2
    assert HAN_SPACE_HAN.search(text) is None and re.search(f"{HAN}{{5}}", text)
    # Both segments are corpus text (lowercased, spaces aside), read back as written.
    sentences = "".join(_sentences(corpus)).lower().replace(" ", "")
    for segment in text.removeprefix("[CLS] ").removesuffix(" [SEP]").split(" [SEP] "):
        assert segment.replace(" ", "") in sentences
