"""Whole-word masking of Chinese on a slice of the shared Chinese corpus: masked groups are jieba's words.

The slice is short sentences of ``corpus_zh/fortunes-zh.jsonl`` (mixed Chinese and English), one per
document, so every example is ``[CLS] A [SEP] B [SEP]`` with A and B whole sentences (no truncation) and
``a_doc_id``/``b_doc_id`` say which: the test recomputes each token's word from jieba and the tokenizer's
offsets, independently of data_prep/zh_words.py, and compares.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jieba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert.pretrain.data import Collator, open_split
from data_prep import reader, zh_words
from data_prep.examples_stage import ExamplesConfig, generate_examples
from data_prep.manifest import begin_stage, file_entry, sha256_file
from data_prep.masking import never_predicted_ids, num_to_predict
from data_prep.schema import CORPUS_SCHEMA, SPECIAL_TOKENS, WORD_START_COLUMN, ExampleMetadata
from data_prep.vocab import bert_tokenizer, load_vocab

HAN = re.compile("[\u4e00-\u9fff\u3400-\u4dbf]")
NUM_SENTENCES = 600
MAX_SENTENCE_TOKENS = 60  # two sentences + 3 specials fit in 128: no truncation
UNKNOWN = "的是了"  # Han characters left out of the vocabulary: [UNK], never a target


def chinese_sentences(corpus: Path) -> list[str]:
    """Short sentences with Chinese in them, wrapped lines joined (no space between Han characters)."""
    sentences = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            text = re.sub(r"(?<=[\u4e00-\u9fff])\n(?=[\u4e00-\u9fff])", "", text)
            for paragraph in re.split(r"\n\s*\n", text):
                for piece in re.split(r"(?<=[。！？])", " ".join(paragraph.split())):
                    piece = piece.strip()
                    if 6 <= len(piece) <= 50 and HAN.search(piece):
                        sentences.append(piece)
            if len(sentences) >= NUM_SENTENCES:
                return sentences[:NUM_SENTENCES]
    return sentences


def write_vocab(directory: Path, sentences: list[str]) -> Path:
    """Every character of the slice (but UNKNOWN) and "##" + every ASCII letter and digit: Latin words
    become "##" pieces, each Han character a token."""
    chars = sorted({c.lower() for s in sentences for c in s if not c.isspace()} - set(UNKNOWN))
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text(
        "\n".join([*SPECIAL_TOKENS, *chars, *pieces]) + "\n", encoding="utf-8"
    )
    return directory


def write_corpus(directory: Path, sentences: list[str]) -> Path:
    """A finished shard stage (language zh): one sentence per document, two train shards and a valid one."""
    stage = begin_stage(directory, "shard", {"language": "zh", "slice": len(sentences)}, {}, 1)
    parts = {"train/part-00000.parquet": [], "train/part-00001.parquet": [], "valid/part-00000.parquet": []}
    names = list(parts)
    for doc_id, sentence in enumerate(sentences):
        name = names[2] if doc_id % 10 == 9 else names[doc_id % 2]
        parts[name].append({"doc_id": doc_id, "source": f"zh:{doc_id}", "sentences": [sentence]})
    files = []
    for name, docs in parts.items():
        stage.path(name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(docs, schema=CORPUS_SCHEMA), stage.path(name))
        files.append(file_entry(directory, name))
    stage.commit(files, {"documents": len(sentences)})
    return directory


def expected_words(tokenizer, sentence: str) -> tuple[list[int], list[str]]:
    """(ids, word number per token) of a sentence: Han characters grouped by jieba's words, other tokens
    by "##" pieces."""
    encoding = tokenizer.encode(sentence, add_special_tokens=False)
    word_of_char = []
    for k, word in enumerate(jieba.lcut(sentence)):
        word_of_char += [k] * len(word)
    words, previous_han, word = [], None, -1
    for token, (start, end) in zip(encoding.tokens, encoding.offsets, strict=True):
        han = end - start == 1 and HAN.match(sentence[start]) is not None
        same_jieba_word = (
            han and previous_han is not None and word_of_char[start] == word_of_char[previous_han]
        )
        if not (same_jieba_word or (token.startswith("##") and words)):
            word += 1
        words.append(word)
        previous_han = start if han else None
    return encoding.ids, words


@pytest.fixture(scope="module")
def zh(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("zh")
    sentences = chinese_sentences(shared_data / "corpus_zh" / "fortunes-zh.jsonl")
    vocab_dir = write_vocab(root / "vocab", sentences)
    tokenizer = load_vocab(vocab_dir).tokenizer
    kept = [
        s for s in sentences if len(tokenizer.encode(s, add_special_tokens=False).ids) <= MAX_SENTENCE_TOKENS
    ]
    return {
        "root": root,
        "corpus": write_corpus(root / "corpus", kept),
        "vocab": vocab_dir,
        "sentences": kept,
    }


def run(zh, name: str, workers: int = 1, masking: str = "static") -> Path:
    out = zh["root"] / name
    generate_examples(
        ExamplesConfig(
            zh["corpus"],
            zh["vocab"],
            out,
            max_seq_length=128,
            masking=masking,
            short_seq_prob=0.0,
            whole_word_mask=True,
            seed=3,
            workers=workers,
            cache_dir=zh["root"] / f"cache-{name}",
        )
    )
    return out


def example_words(zh, tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(original ids, word number per position; -1 for [CLS]/[SEP]) of one example from its lineage."""
    ids, words = [zh["cls"]], [-1]
    for doc_id in (row["a_doc_id"], row["b_doc_id"]):
        sentence_ids, sentence_words = expected_words(tokenizer, zh["sentences"][doc_id])
        offset = max(words) + 1
        ids += [*sentence_ids, zh["sep"]]
        words += [w + offset for w in sentence_words] + [-1]
    return ids, words


def check_whole_words(
    ids: list[int], words: list[int], chosen: set[int], never: set[int], han: set[int]
) -> int:
    """Assert every word is chosen whole or not at all (its [UNK]s aside); returns how many words of
    several Han characters were chosen."""
    whole = 0
    for word in set(words) - {-1}:
        members = [p for p, w in enumerate(words) if w == word and ids[p] not in never]
        taken = [p in chosen for p in members]
        assert all(taken) or not any(taken), f"word at {members} split: {taken}"
        if members and all(taken) and len(members) > 1 and all(ids[p] in han for p in members):
            whole += 1
    return whole


def han_ids(tokens: list[str]) -> set[int]:
    return {i for i, t in enumerate(tokens) if HAN.fullmatch(t)}


def test_static_whole_word_masks_are_jieba_words_and_same_for_any_workers(zh):
    one, two = run(zh, "static-1", workers=1), run(zh, "static-2", workers=2)
    digests = {p.relative_to(one).as_posix(): sha256_file(p) for p in sorted(one.rglob("*.arrow"))}
    assert digests and digests == {
        p.relative_to(two).as_posix(): sha256_file(p) for p in sorted(two.rglob("*.arrow"))
    }
    cache_one = sorted((zh["root"] / "cache-static-1").rglob("part-*.arrow"))
    cache_two = sorted((zh["root"] / "cache-static-2").rglob("part-*.arrow"))
    assert [sha256_file(p) for p in cache_one] == [sha256_file(p) for p in cache_two]

    vocab = load_vocab(zh["vocab"])
    zh.update(cls=vocab.special_ids["cls"], sep=vocab.special_ids["sep"])
    never = set(never_predicted_ids(vocab.special_ids).tolist())
    metadata = reader.read_metadata(one)
    assert metadata.word_segmenter == f"jieba {jieba.__version__}" == zh_words.segmenter_name()
    rows = list(reader.iter_examples(one, "train"))
    assert len(rows) > 400
    han = han_ids(vocab.tokens)
    whole, han_masked, unk_seen = 0, 0, 0
    for row in rows:
        masked_ids, positions = row["input_ids"], row["masked_lm_positions"]
        original = list(masked_ids)
        for p, label in zip(positions, row["masked_lm_ids"], strict=True):
            original[p] = label
        ids, words = example_words(zh, vocab.tokenizer, row)
        assert original == ids  # whole sentences, as the lineage says
        assert not never & set(row["masked_lm_ids"])  # never [UNK], [CLS], [SEP], [PAD], [MASK]
        assert (
            len(positions) <= num_to_predict(np.array([len(ids)]), 0.15, metadata.max_predictions_per_seq)[0]
        )
        whole += check_whole_words(ids, words, set(positions), never, han)
        han_masked += sum(ids[p] in han for p in positions)
        unk_seen += ids.count(vocab.special_ids["unk"])
    assert whole > 200 and han_masked > 1000 and unk_seen > 100  # not vacuous


def test_dynamic_masking_groups_the_same_words(zh):
    out = run(zh, "dynamic", masking="dynamic")
    vocab = load_vocab(zh["vocab"])
    zh.update(cls=vocab.special_ids["cls"], sep=vocab.special_ids["sep"])
    never = set(never_predicted_ids(vocab.special_ids).tolist())
    metadata: ExampleMetadata = reader.read_metadata(out)
    assert metadata.word_segmenter == zh_words.segmenter_name()
    rows = list(reader.iter_examples(out, "train"))  # with lineage, to know each example's sentences
    shards = open_split(out, "train")  # what the trainer reads
    assert len(shards) == len(rows)
    collator = Collator(shards.metadata, seed=11, pad_to_multiple_of=1, tokens=vocab.tokens)
    han, whole = han_ids(vocab.tokens), 0
    for index, row in enumerate(rows):
        ids, words = example_words(zh, vocab.tokenizer, row)
        assert row["input_ids"] == ids == shards[index]["input_ids"].tolist()  # stored unmasked
        starts = [int(p == 0 or words[p] == -1 or words[p] != words[p - 1]) for p in range(len(ids))]
        assert row[WORD_START_COLUMN] == starts  # the boundaries static masking uses: jieba's words
        batch = collator(shards, np.array([index]), epoch=0)
        chosen = set(np.flatnonzero(batch["labels"][0].numpy() != -100).tolist())
        assert not {ids[p] for p in chosen} & never
        whole += check_whole_words(ids, words, chosen, never, han)
    assert whole > 200


def test_segmenter_groups_han_characters_of_mixed_text():
    sentence = "我们在Debian操作系统上使用浏览器"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"我们在操作系统上使用浏览器", "de", "##bian"]
    tokenizer = bert_tokenizer({t: i for i, t in enumerate(tokens)}, lowercase=True)
    encoding = tokenizer.encode(sentence, add_special_tokens=False)
    flags = zh_words.continues_word(sentence, encoding.offsets)
    groups, current = [], ""
    for token, continues in zip(encoding.tokens, flags, strict=True):
        if continues:
            current += token
        else:
            if current:
                groups.append(current)
            current = token
    groups.append(current)
    han_words = [w for w in jieba.lcut(sentence) if HAN.match(w)]
    assert [g for g in groups if HAN.match(g)] == han_words
    assert "de" in groups and "##bian" in groups  # Latin pieces are left to "##" grouping
