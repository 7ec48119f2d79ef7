"""bert/pretrain.py and bert/engine.py in one process (DeepSpeed, a world of one over gloo).

Resume exactness, the Hugging Face export against transformers, refusal of mismatched examples, and the
DeepSpeed "auto" filling. Launcher tests (two ranks, SIGTERM) are in tests/test_pretrain_distributed.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import TINY, make_examples, make_vocab

from bert.model import BertConfig, BertForPreTraining
from bert.pretrain.config import TrainConfig, resolve_batch_sizes
from bert.pretrain.ds_config import fill_deepspeed_config, load_deepspeed_config
from bert.pretrain.engine import checkpoint_state_dict
from bert.pretrain.rank import main

REPO = Path(__file__).resolve().parents[1]


def tiny_config(examples: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        examples=str(examples),
        out=str(out),
        model_overrides=TINY,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        lr=1e-2,
        warmup_steps=2,
        max_steps=8,
        progress_bar=False,
        tensorboard=False,
    )
    return TrainConfig(**{**values, **overrides})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    vocab = make_vocab(root / "vocab")
    return make_examples(root / "examples", vocab, num_train=64, num_valid=16), vocab


@pytest.mark.slow
def test_run_trains_logs_checkpoints_and_exports_for_transformers(stage, tmp_path: Path):
    examples, _ = stage
    out = tmp_path / "run"
    result = main(tiny_config(examples, out, max_steps=24, eval_every=12, tensorboard=True))
    assert result.step == 24 and result.stop_reason == "max_steps"
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in (
        "loss",
        "mlm_loss",
        "nsp_loss",
        "mlm_acc",
        "nsp_acc",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "samples_per_s",
    ):
        assert all(np.isfinite(r[key]) for r in records), key
    assert np.mean([r["loss"] for r in records[-4:]]) < np.mean([r["loss"] for r in records[:4]]) - 0.5
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [12, 24]
    assert (out / "checkpoints/latest").read_text().strip() == "step-24"
    assert list((out / "tensorboard").iterdir())
    assert json.loads((out / "result.json").read_text())["step"] == 24

    transformers = pytest.importorskip("transformers")
    hf_model, info = transformers.BertForPreTraining.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    assert tokenizer.convert_tokens_to_ids(["[MASK]", "w3"]) == [4, 8]

    ours = BertForPreTraining(BertConfig.preset("tiny", vocab_size=100, **TINY)).eval()
    ours.load_state_dict(checkpoint_state_dict(out / "checkpoints", "step-24"))  # the trained weights
    input_ids = torch.tensor([[2, 9, 4, 11, 12, 3, 13, 4, 3]])
    labels = torch.full_like(input_ids, -100)
    labels[0, [2, 7]] = torch.tensor([10, 14])
    with torch.no_grad():
        expected = hf_model.eval()(input_ids=input_ids).prediction_logits[0, [2, 7]]
        got = ours(input_ids, labels=labels)
    assert torch.allclose(got.mlm_logits, expected, atol=1e-5)


@pytest.mark.slow
def test_resume_continues_exactly(stage, tmp_path: Path):
    examples, _ = stage
    # 64 examples, global batch 8: 8 steps per epoch, so the runs cross an epoch boundary at step 8.
    common = dict(max_steps=12, schedule_steps=12, save_every=0, eval_every=0)
    straight = main(tiny_config(examples, tmp_path / "straight", **common))
    first = main(tiny_config(examples, tmp_path / "split", **{**common, "max_steps": 6}))
    assert first.step == 6
    resumed = main(tiny_config(examples, tmp_path / "split", **common, resume=True))
    assert straight.step == resumed.step == 12
    a = [r for r in read_metrics(tmp_path / "straight") if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "split") if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), x["step"]
        assert x["lr"] == y["lr"]
    weights_a = checkpoint_state_dict(tmp_path / "straight/checkpoints")
    weights_b = checkpoint_state_dict(tmp_path / "split/checkpoints")
    for name, value in weights_a.items():
        assert torch.allclose(value, weights_b[name], atol=1e-6), name
    with pytest.raises(ValueError, match="already holds checkpoints"):
        main(tiny_config(examples, tmp_path / "split", max_steps=14))


@pytest.mark.slow
def test_time_budget_stops_between_steps_with_a_checkpoint_and_export(stage, tmp_path: Path):
    examples, _ = stage
    config = tiny_config(examples, tmp_path / "run", max_steps=None, time_budget="4s", decay="constant")
    result = main(config)
    assert result.stop_reason == "time_budget" and result.step >= 1
    assert (tmp_path / f"run/checkpoints/step-{result.step}").is_dir() and (
        tmp_path / "run/hf/config.json"
    ).exists()


def test_mismatched_examples_are_refused_before_training(stage, tmp_path: Path):
    examples, _ = stage
    other_vocab = make_vocab(tmp_path / "other", prefix="x")
    out = tmp_path / "run"
    config = tiny_config(
        examples,
        out,
        vocab=str(other_vocab),
        model_overrides={**TINY, "max_position_embeddings": 16, "vocab_size": 50},
    )
    with pytest.raises(ValueError) as error:
        main(config)
    message = str(error.value)
    assert "nothing was trained" in message
    assert "fingerprint" in message and "another vocab.txt" in message
    assert "100 ids, the model has 50" in message
    assert "only 16 positions" in message
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_init_from_starts_phase_two_from_an_export_with_a_fresh_schedule(stage, tmp_path: Path):
    examples, _ = stage
    main(tiny_config(examples, tmp_path / "phase1", max_steps=3))
    exported = checkpoint_state_dict(tmp_path / "phase1/checkpoints")
    run = main(
        tiny_config(examples, tmp_path / "phase2", max_steps=2, init_from=str(tmp_path / "phase1")),
        do_train=False,
    )
    assert run.engine.global_step == 0
    start = run.engine.module.state_dict()
    assert torch.equal(
        start["bert.embeddings.word_embeddings.weight"], exported["bert.embeddings.word_embeddings.weight"]
    )
    shutil.rmtree(tmp_path / "phase2", ignore_errors=True)


def test_deepspeed_config_auto_values_are_filled_and_disagreements_listed():
    config = TrainConfig(examples="e", out="o", max_steps=10, max_grad_norm=0.5, lr=2e-4, precision="fp32")
    batch = resolve_batch_sizes(2, micro_batch_size=4, gradient_accumulation_steps=2)
    template = json.loads((REPO / "deepspeed_configs/zero3_fp32.json").read_text())
    filled, precision = fill_deepspeed_config(template, config, batch, hidden_size=32)
    assert precision == "fp32"
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert filled["gradient_accumulation_steps"] == 2 and filled["gradient_clipping"] == 0.5
    assert filled["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert "auto" not in json.dumps(filled)
    bf16, precision = fill_deepspeed_config(
        json.loads((REPO / "deepspeed_configs/zero2_bf16.json").read_text()),
        TrainConfig(examples="e", out="o", max_steps=10),
        batch,
        32,
    )
    assert precision == "bf16" and bf16["bf16"]["enabled"] is True
    assert bf16["zero_optimization"]["stage"] == 2 and "data_types" not in bf16  # a JSON's own stage stays
    # No JSON: ZeRO stage "auto", bf16 -> ZeRO-1 accumulating in fp32 (BF16_Optimizer), fp32 -> ZeRO-0.
    default = load_deepspeed_config(None)
    for asked, stage, data_types in (
        ("bf16", 1, {"grad_accum_dtype": "fp32"}),
        ("fp32", 0, None),
        ("auto", 0, None),
    ):
        filled, precision = fill_deepspeed_config(default, TrainConfig(examples="e", out="o", max_steps=10,
                                                                       precision=asked), batch, 32)  # fmt: skip
        assert filled["zero_optimization"]["stage"] == stage and filled.get("data_types") == data_types, asked
        assert "auto" not in json.dumps(filled)
    assert default == load_deepspeed_config(None)  # filled copies, the default untouched
    wrong = {
        "train_batch_size": 32,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "betas": "auto"}},
        "zero_optimization": {"stage": 2, "sub_group_size": "auto"},
    }
    with pytest.raises(ValueError) as error:
        fill_deepspeed_config(wrong, config, batch, 32)
    message = str(error.value)
    for expected in ("train_batch_size", "gradient_clipping", "bf16.enabled", "optimizer.type", "optimizer.params.lr",
                     "zero_optimization.sub_group_size"):  # fmt: skip
        assert expected in message, expected


@pytest.mark.slow
def test_real_stages_pretrain_and_export_a_loadable_tokenizer(shared_data: Path, tmp_path: Path):
    import subprocess
    import sys

    bertpipe = str(Path(sys.executable).parent / "bertpipe")
    corpus, vocab, examples = tmp_path / "corpus", tmp_path / "vocab", tmp_path / "examples"
    for args in (
        ["shard", "--input", str(shared_data / "corpus/inaugural"), "--out", str(corpus), "--num-shards", "2",
         "--doc-boundary", "file"],
        ["vocab", "--corpus", str(corpus), "--out", str(vocab), "--vocab-size", "2000"],
        ["examples", "--corpus", str(corpus), "--vocab", str(vocab), "--out", str(examples), "--max-seq-length", "64",
         "--masking", "static"],
    ):  # fmt: skip
        subprocess.run([bertpipe, *args], check=True, capture_output=True)
    result = main(tiny_config(examples, tmp_path / "run", vocab=str(vocab), max_steps=3, micro_batch_size=8))
    assert result.step == 3 and np.isfinite(result.metrics["loss"])
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "run/hf")
    assert tokenizer.vocab_size == len((vocab / "vocab.txt").read_text().splitlines())
    assert tokenizer("We the people")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.slow
def test_the_rank_entry_point_destroys_the_process_group_on_every_exit(stage, tmp_path: Path):
    """bert.pretrain.cli (what every rank runs) leaves no process group behind, trained or failed.

    In a process of its own: DeepSpeed keeps its groups, so this process could not train again afterwards.
    """
    import subprocess
    import sys

    examples, _ = stage
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(tiny_config(examples, tmp_path / "good", max_steps=2).to_dict()))
    mismatched = tiny_config(examples, tmp_path / "bad", model_overrides={**TINY, "vocab_size": 50})
    bad.write_text(json.dumps(mismatched.to_dict()))  # refused after the process group exists
    script = (
        "import sys, torch.distributed as dist; from bert.pretrain.rank import cli\n"
        "codes = [cli(['--config', path]) for path in sys.argv[1:]]\n"
        "print('RESULT', codes, dist.is_initialized())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(good), str(bad)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)  # fmt: skip
    assert "RESULT [0, 2] False" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    assert "nothing was trained" in (tmp_path / "bad/logs/error-rank0.txt").read_text()
