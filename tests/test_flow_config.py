"""The pipeline config: presets, flat overrides, typed stage configs built (and refused) before any work."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.config import (
    PipelineConfigError,
    apply_overrides,
    build_stage_configs,
    load_pipeline_config,
    preset_path,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_preset_builds_typed_configs_and_names_real_files(shared_data, tmp_path):
    for preset in sorted((REPO / "configs/pipeline").glob("*.json")):
        config = load_pipeline_config(preset.stem)
        configs = build_stage_configs(config, shared_data, tmp_path / preset.stem)
        assert configs.shard.out == str(tmp_path / preset.stem / "corpus")
        if preset.stem == "demo":
            for path in configs.shard.inputs + [str(t.train) for t in configs.finetune]:
                assert Path(path).exists(), path
            assert configs.pretrain.examples == str(tmp_path / "demo/examples")
            assert [t.out for t in configs.finetune] == [str(tmp_path / f"demo/finetune-{t.task}")
                                                         for t in configs.finetune]  # fmt: skip


def test_ner_tapt_preset_pretrains_on_the_words_of_its_own_ner_training_file(shared_data, tmp_path):
    from collections import Counter

    from data_prep.textio import discover_inputs, iter_unit_documents

    configs = build_stage_configs(load_pipeline_config("ner-tapt"), shared_data, tmp_path)
    (ner,) = configs.finetune
    assert configs.shard.inputs == [str(ner.train)] and configs.baselines == {"ner": ["random-init"]}
    assert ner.max_train_examples and len(ner.seeds) >= 3
    (unit,), _ = discover_inputs(configs.shard.inputs)
    _, sentences = next(iter_unit_documents(unit, configs.shard.doc_boundary, "text", Counter()))
    assert sentences[0] == "EU rejects German call to boycott British lamb ."  # words, not tag columns


def test_overrides_set_nested_keys_tasks_and_corpus():
    base = {"corpus": ["a"], "pretrain": {"lr": 1e-3, "model_overrides": {"hidden_size": 32}},
            "finetune": [{"task": "cola", "lr": 1e-4}, {"task": "sst2", "lr": 1e-4}]}  # fmt: skip
    values = apply_overrides(base, ["pretrain.lr=5e-4", "pretrain.model_overrides.num_hidden_layers=1",
                                    "finetune.sst2.epochs=2", "finetune.lr=3e-5", "corpus=x,y",
                                    "examples.masking=dynamic", "finetune.0.seeds=[0,1]"])  # fmt: skip
    assert values["pretrain"] == {"lr": 5e-4, "model_overrides": {"hidden_size": 32, "num_hidden_layers": 1}}
    assert values["finetune"] == [{"task": "cola", "lr": 3e-5, "seeds": [0, 1]},
                                  {"task": "sst2", "lr": 3e-5, "epochs": 2}]  # fmt: skip
    assert values["corpus"] == ["x", "y"] and values["examples"] == {"masking": "dynamic"}
    assert base["pretrain"]["lr"] == 1e-3  # the preset itself is untouched
    with pytest.raises(PipelineConfigError, match="not section.key=value"):
        apply_overrides(base, ["pretrain.lr"])
    with pytest.raises(PipelineConfigError, match="unknown section 'pretrian'"):
        apply_overrides(base, ["pretrian.lr=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("shard.num_shard=4", 'section "shard": unknown key "num_shard"; known keys:'),
        ("finetune.cola.lrr=1e-4", 'section "finetune[0]": unknown key "lrr"'),
        ("pretrain.learning_rate=1", 'section "pretrain": unknown key "learning_rate"'),
        ("examples.masked_lm_prob=2", 'section "examples": masked_lm_prob=2 must be in (0, 1]'),
        ("pretrain.optimizer=sgd", 'section "pretrain": invalid training config: - optimizer must be one of'),
        (
            'pretrain.compile_options={"fallback_randm": true}',
            "- compile_options: 'fallback_randm' is not an Inductor setting of this torch (did you mean fallback_random",
        ),
        ("shard.num_shards=four", 'section "shard":'),
        ("vocab.out=/tmp/x", 'section "vocab": "out" is set by the pipeline'),
        ("pretrain.num_gpus=0", "num_gpus must be a positive integer"),
    ],
)
def test_a_bad_setting_is_one_line_naming_section_and_key(shared_data, tmp_path, override, message):
    with pytest.raises(PipelineConfigError) as error:
        build_stage_configs(load_pipeline_config("demo", [override]), shared_data, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_refuses_a_misspelt_finetune_key_before_any_stage_runs(tmp_path, shared_data):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--set", "finetune.cola.epoch=2", "--out", str(out),
                                      "--shared", str(shared_data.parent)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert 'section "finetune[0]": unknown key "epoch"' in result.output and "Traceback" not in result.output
    assert not (out / "corpus").exists()  # nothing ran


def test_bad_preset_files_are_one_clear_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"corpus": ["x"], "shards": {}}))
    with pytest.raises(PipelineConfigError, match=r"unknown keys \['shards'\]"):
        load_pipeline_config(bad)
    with pytest.raises(PipelineConfigError, match="no pipeline preset 'nope'"):
        preset_path("nope")
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "does not exist" in result.output
