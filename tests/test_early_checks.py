"""Settings that can be checked before work starts are checked then, and a full disk is named: one line, exit 2.

`bertpipe run` refuses a missing corpus or task file, a missing or contradicting DeepSpeed JSON and more ranks
than the machine can hold before any stage directory exists; `bertpipe examples` (and `run`) say that the disk
is full and where, instead of a traceback, and leave nothing that passes for complete.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

GIB = 2**30


def one_line_error(result) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture
def cpu_machine(monkeypatch):
    """The ranks run on the CPU (DeepSpeed's CPU accelerator), on a machine of 2 cores with 8 GiB free."""
    import psutil

    from bert.pretrain import launch

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("BERTPIPE_ALLOW_OVERSUBSCRIBE", raising=False)
    monkeypatch.setattr(launch, "usable_cores", lambda: 2, raising=False)
    memory = psutil.virtual_memory()._replace(available=8 * GIB)
    monkeypatch.setattr(launch.psutil, "virtual_memory", lambda: memory)


@pytest.fixture
def run_demo(shared_data, tmp_path, cpu_machine, monkeypatch):
    """``bertpipe run`` of the demo preset with overrides into a fresh OUT: (refusal line, OUT).

    The flow itself is replaced: a setting that slipped through must fail the test, not start the stages.
    """
    import flows.pipeline

    out = tmp_path / "run"
    started = []
    monkeypatch.setattr(flows.pipeline, "bert_pipeline", lambda **kwargs: started.append(kwargs))

    def run(*overrides: str, stages: str | None = None) -> tuple[str, Path]:
        args = ["run", "--out", str(out), "--shared", str(shared_data.parent)]
        args += [a for o in overrides for a in ("--set", o)]
        args += ["--stages", stages] if stages else []
        result = CliRunner().invoke(app, args)
        assert not started, "the flow started: the setting was not refused before work"
        line = one_line_error(result)
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())  # no stage ran
        return line, out

    return run


def prepared(shared_data, tmp_path, *overrides: str, stages=None):
    """The demo pipeline's configs as `bertpipe run` prepares them (and refuses them)."""
    from flows.pipeline import prepare

    return prepare("demo", list(overrides), tmp_path / "run", shared_data.parent, stages=stages)


# --- bad flow settings: refused before any stage runs ---------------------------------------------------------


def test_a_missing_corpus_is_refused_before_the_shard_stage(run_demo):
    line, _ = run_demo("corpus=/nonexistent/corpus")
    assert "/nonexistent/corpus does not exist" in line and "corpus" in line


def test_a_missing_finetune_train_file_is_refused_before_the_shard_stage(run_demo):
    line, _ = run_demo("finetune.cola.train=/nonexistent/train.tsv")
    assert 'section "finetune[0]" (cola)' in line and "/nonexistent/train.tsv does not exist" in line


def test_a_missing_deepspeed_config_is_refused_before_the_shard_stage(run_demo):
    line, _ = run_demo("pretrain.deepspeed_config=/nonexistent/ds.json")
    assert 'section "pretrain"' in line and "DeepSpeed config /nonexistent/ds.json does not exist" in line


def test_a_deepspeed_config_that_is_not_json_is_refused(run_demo, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    line, _ = run_demo(f"pretrain.deepspeed_config={bad}")
    assert f"DeepSpeed config {bad} is not valid JSON" in line


def test_a_deepspeed_config_that_contradicts_the_training_config_is_refused(run_demo, tmp_path):
    contradicting = tmp_path / "ds.json"  # the demo trains micro batches of 64
    contradicting.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 0}})
    )
    line, _ = run_demo(f"pretrain.deepspeed_config={contradicting}")
    assert "the DeepSpeed config disagrees with the training config" in line
    assert "train_micro_batch_size_per_gpu is 3 in the DeepSpeed config, 64 in the training config" in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "pretrain.model_config=/nonexistent/config.json",
            "model config /nonexistent/config.json does not exist",
        ),
        ("pretrain.model_config=huge", "unknown model preset 'huge'"),
        ("pretrain.init_from=/nonexistent/hf", "/nonexistent/hf is neither a Hugging Face directory"),
        ("vocab.from_path=/nonexistent/vocab", "from_path /nonexistent/vocab does not exist"),
        ("pretrain.global_batch_size=100", "global batch 100 is not divisible"),
        ("examples.max_seq_length=1024", "max_seq_length 1024 exceeds the model's 512 positions"),
    ],
)
def test_other_inputs_the_stages_would_fail_on_later_are_refused_now(run_demo, override, message):
    line, _ = run_demo(override)
    assert message in line


def test_a_model_config_file_that_is_not_json_is_refused(run_demo, tmp_path):
    bad = tmp_path / "model.json"
    bad.write_text("{not json")
    line, _ = run_demo(f"pretrain.model_config={bad}")
    assert f"{bad} is not a JSON model config" in line


def test_more_cpu_ranks_than_cores_are_refused_naming_the_override(run_demo):
    line, _ = run_demo("pretrain.num_gpus=64")
    assert "64 ranks" in line and "2 CPU cores" in line and "BERTPIPE_ALLOW_OVERSUBSCRIBE=1" in line


def test_the_oversubscribe_override_is_accepted(shared_data, tmp_path, cpu_machine, monkeypatch):
    monkeypatch.setenv("BERTPIPE_ALLOW_OVERSUBSCRIBE", "1")
    _, configs = prepared(
        shared_data,
        tmp_path,
        "pretrain.num_gpus=4",
        "pretrain.micro_batch_size=32",
        "pretrain.global_batch_size=128",
    )
    assert configs.num_gpus == 4
    assert not (tmp_path / "run").exists()


def test_two_ranks_are_accepted_even_on_one_core(shared_data, tmp_path, cpu_machine, monkeypatch):
    from bert.pretrain import launch

    monkeypatch.setattr(launch, "usable_cores", lambda: 1)
    _, configs = prepared(shared_data, tmp_path, "pretrain.num_gpus=2", "pretrain.micro_batch_size=32")
    assert configs.num_gpus == 2


def test_ranks_that_do_not_fit_in_memory_are_refused_even_with_the_override(run_demo, monkeypatch):
    import psutil

    from bert.pretrain import launch

    monkeypatch.setenv("BERTPIPE_ALLOW_OVERSUBSCRIBE", "1")
    memory = psutil.virtual_memory()._replace(available=1 * GIB)
    monkeypatch.setattr(launch.psutil, "virtual_memory", lambda: memory)
    line, _ = run_demo("pretrain.num_gpus=4", "pretrain.global_batch_size=128")
    assert "4 ranks need about" in line and "available" in line


def test_more_ranks_than_cuda_devices_are_refused(monkeypatch, tmp_path):
    import torch

    from bert.pretrain import launch
    from bert.pretrain.config import TrainConfig

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = TrainConfig(examples=str(tmp_path / "e"), out=str(tmp_path / "o"), max_steps=2)
    with pytest.raises(ValueError, match="2 ranks on this node, which has 1 CUDA device"):
        launch.check_pretrain_launch(config, 2, None)
    assert launch.check_pretrain_launch(config, 1, None) == 1


VARLEN = 'pretrain.model_overrides={"unpad_attention": "varlen", "attention_probs_dropout_prob": 0.0}'


def test_varlen_attention_on_the_cpu_is_refused_before_the_shard_stage(run_demo):
    line, _ = run_demo(VARLEN)
    assert "unpad_attention='varlen'" in line and "CUDA GPUs only" in line and "'padded'" in line


@pytest.mark.parametrize(
    "precision, torch_has_varlen, message",
    [
        ("fp32", True, "in bf16 or fp16 only, but this run trains in fp32"),
        ("bf16", False, "needs torch 2.10 or later"),
        ("bf16", True, None),
    ],
)
def test_varlen_attention_needs_a_half_precision_and_a_torch_that_has_it(
    monkeypatch, tmp_path, precision, torch_has_varlen, message
):
    import importlib.util

    import torch

    from bert.pretrain import launch
    from bert.pretrain.config import TrainConfig

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        launch.importlib.util, "find_spec",
        lambda name, *a: None if name == "torch.nn.attention.varlen" and not torch_has_varlen else find_spec(name, *a),
    )  # fmt: skip
    config = TrainConfig(
        examples=str(tmp_path / "e"), out=str(tmp_path / "o"), max_steps=2, precision=precision,
        model_overrides={"unpad_attention": "varlen", "attention_probs_dropout_prob": 0.0},
    )  # fmt: skip
    if message is None:
        assert launch.check_pretrain_launch(config, 1, None) == 1
    else:
        with pytest.raises(ValueError, match=message):
            launch.check_pretrain_launch(config, 1, None)
    # the default attention is never refused for any of these
    padded = TrainConfig(examples=config.examples, out=config.out, max_steps=2, precision=precision)
    assert launch.check_pretrain_launch(padded, 1, None) == 1


def test_the_checks_apply_to_the_stages_that_run(shared_data, tmp_path, cpu_machine):
    # Data stages only: the pretraining settings (64 ranks here) are not this run's business.
    _, configs = prepared(
        shared_data, tmp_path, "pretrain.num_gpus=64", stages=["shard", "vocab", "examples"]
    )
    assert configs.num_gpus == 64
    from flows.config import PipelineConfigError

    with pytest.raises(PipelineConfigError, match="unknown stages"):
        prepared(shared_data, tmp_path, stages=["shard", "pretrian"])


def test_bertpipe_pretrain_refuses_more_ranks_than_cores(tmp_path, cpu_machine):
    from test_data import make_training_stage

    examples, model_config = make_training_stage(tmp_path, num_train=16, num_valid=8)
    result = CliRunner().invoke(app, ["pretrain", "--examples", str(examples), "--out", str(tmp_path / "o"),
                                      "--model-config", str(model_config), "--max-steps", "2",
                                      "--micro-batch-size", "1", "--num-gpus", "16"])  # fmt: skip
    assert "16 ranks" in one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_the_parameter_estimate_counts_the_pretraining_model():
    from bert.model import BertConfig, BertForPreTraining
    from bert.pretrain.launch import parameter_count

    config = BertConfig.preset(
        "tiny", vocab_size=300, hidden_size=32, num_attention_heads=2, intermediate_size=64
    )
    assert parameter_count(config) == sum(p.numel() for p in BertForPreTraining(config).parameters())


# --- a full disk: one line that says so and where -------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_and_vocab(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("disk")
    inputs = [shared_data / f"corpus/inaugural/{name}.txt" for name in ("1789-Washington", "1793-Washington")]
    shard = ["shard", *(a for p in inputs for a in ("--input", str(p))), "--out", str(root / "corpus"),
             "--num-shards", "1", "--doc-boundary", "file", "--workers", "1"]  # fmt: skip
    vocab = ["vocab", "--corpus", str(root / "corpus"), "--out", str(root / "vocab"), "--vocab-size", "200"]
    for args in (shard, vocab):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return root / "corpus", root / "vocab"


def test_a_full_disk_while_writing_examples_is_one_line_and_nothing_passes_for_complete(
    corpus_and_vocab, tmp_path, monkeypatch
):
    from data_prep import writer
    from data_prep.manifest import read_manifest

    corpus, vocab = corpus_and_vocab
    out = tmp_path / "examples"
    args = ["examples", "--corpus", str(corpus), "--vocab", str(vocab), "--out", str(out),
            "--max-seq-length", "32", "--workers", "1"]  # fmt: skip

    def full(self, batch):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(writer.ExampleFileWriter, "write", full)
        line = one_line_error(CliRunner().invoke(app, args))
    assert line.startswith(f"error: the disk is full writing {out} (")
    assert line.endswith(" free): free space or choose another --out")
    assert read_manifest(out) is None and not list(out.rglob("*.arrow"))  # nothing half-written kept
    result = CliRunner().invoke(app, args)  # space freed: the same command finishes the stage
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["stats"]["examples"] > 0


def test_a_full_disk_names_the_file_when_the_error_does_else_the_fullest_place(tmp_path, monkeypatch):
    from flows import cli

    error = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "vocab.txt"))
    assert cli.is_disk_full(error) and not cli.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert cli.is_disk_full(Exception("No space left on device (os error 28)"))  # tokenizers' Rust I/O errors
    try:  # wrapped by a library: found in the chain
        raise RuntimeError("could not write the shard") from OSError(errno.ENOSPC, "No space left on device")
    except RuntimeError as wrapped:
        assert cli.is_disk_full(wrapped)
    message = cli.disk_full_message(error, tmp_path / "elsewhere")
    assert message.startswith(f"the disk is full writing {tmp_path / 'vocab.txt'} (")
    # No file named: of the command's places (--out, a cache elsewhere), the one with the least space left.
    import data_prep.manifest

    monkeypatch.setattr(
        data_prep.manifest, "free_bytes", lambda path: 0 if path.name == "cache" else 10 * GIB
    )
    message = cli.disk_full_message(
        OSError(errno.ENOSPC, "No space left"), tmp_path / "out", tmp_path / "cache"
    )
    assert message == (
        f"the disk is full writing {tmp_path / 'cache'} (0 bytes free): free space or choose another --out"
    )


def test_a_full_disk_during_bertpipe_run_is_one_line(shared_data, tmp_path, monkeypatch, cpu_machine):
    from prefect.states import Failed

    import flows.pipeline

    def full_disk_run(**kwargs):
        return Failed(data=OSError(errno.ENOSPC, "No space left on device"), message="OSError")

    monkeypatch.setattr(flows.pipeline, "bert_pipeline", full_disk_run)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--shared", str(shared_data.parent)])
    line = one_line_error(result)
    assert line.startswith(f"error: the disk is full writing {out} (") and "choose another --out" in line
