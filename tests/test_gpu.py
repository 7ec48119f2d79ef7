"""On a CUDA device (skipped elsewhere): a bf16 ZeRO-1 run saves, resumes and exports through the launcher,
and fine-tuning places model and batches on the GPU, matching the CPU in fp32."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import make_training_stage

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]


def bertpipe(*args: str) -> subprocess.CompletedProcess:
    """The CLI as ``python -m flows.cli`` (no ``bertpipe`` script needs to be installed)."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_accumulated_micro_batches_on_the_gpu_give_the_plain_loops_gradient():
    """The GPU path of test_zero_stages' accumulation test: zero1_bf16 (BF16_Optimizer, bertpipe's step and its
    one add a group), compiled, varlen flash attention, 3 micro batches: the plain loop's gradient (fp32, CPU)."""
    from test_zero_stages import against_a_plain_loop

    fast = {
        "unpad_attention": "varlen",
        "attention_probs_dropout_prob": 0.0,
    }  # no new weights: the plain model's
    got, expected = against_a_plain_loop("zero1_bf16", steps=1, micro=3, clip=1e9, compile=True,
                                         model_overrides=fast)  # fmt: skip
    assert got[0][1] == pytest.approx(expected[0][1], rel=2e-2)


def test_varlen_attention_with_fill_rows_changes_no_loss_or_gradient():
    """Packed to a multiple (``TrainConfig.pack_multiple_of``), flash varlen attention sees the fill rows as
    sequences of their own: the real tokens' loss and the gradients stay those of the exact packing."""
    from test_compile import TINIEST, varied_batch
    from test_pack_multiple import forward_backward

    from bert import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**{**TINIEST, "unpad_attention": "varlen"})).cuda().train()
    inputs = varied_batch(1, 16, [16, 9, 5, 14], [0, 2, 4])
    results = []
    for multiple_of in (0, 7, 100):
        with torch.autocast("cuda", torch.bfloat16):
            out, grads = forward_backward(model, inputs, multiple_of)
        results.append((float(out.loss), grads))
    (loss, grads), others = results[0], results[1:]
    for other_loss, other_grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-2)
        for (
            name,
            grad,
        ) in grads.items():  # bf16 products of other sizes round differently: relative to the norm
            error = float((other_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12))
            assert error < 3e-2, (name, error)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_dropout_on_the_gpu_gives_the_losses_gradient(checkpointing):
    """Inductor's Triton kernels draw the dropout masks (fp32, dropout 0.5, blocks recomputed in the backward or
    not), compiled with the options bertpipe compiles with (``bert.pretrain.config.inductor_options``: on a torch with the 4x
    random path, align_random_eager): the gradient is the derivative of the loss the forward computed, which a
    backward drawing other masks (pytorch/pytorch#198333) misses by ~10%."""
    from test_compile import batch
    from test_dropout_gradients import DROPOUT, relative_miss

    from bert import BertConfig, BertForPreTraining
    from bert.pretrain.config import inductor_options

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**DROPOUT, gradient_checkpointing=checkpointing)).cuda().train()
    options, _ = inductor_options({}, dropout=True, device_type="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, options=options)
    assert relative_miss(compiled, {k: v.cuda() for k, v in batch(0).items()}) < 1e-3


def test_cuda_graphs_packed_to_a_multiple_train_as_a_plain_loop():
    """Inductor's CUDA graphs (``compile_options: {"triton.cudagraphs": true}``) with fill rows, under
    zero1_bf16 (bertpipe's optimizer step between the graphs), 3 clipped steps of 2 micro batches: the plain
    loop's losses and gradient norms (fp32, CPU)."""
    from test_zero_stages import against_a_plain_loop

    fast = {"unpad_attention": "varlen", "attention_probs_dropout_prob": 0.0}
    got, expected = against_a_plain_loop("zero1_bf16", steps=3, micro=2, clip=1.0, compile=True,
                                         compile_options={"triton.cudagraphs": True}, pack_multiple_of=16,
                                         model_overrides=fast)  # fmt: skip
    for step, ((loss, norm), (plain_loss, plain_norm)) in enumerate(zip(got, expected, strict=True)):
        assert loss == pytest.approx(plain_loss, rel=3e-2), step
        assert norm == pytest.approx(plain_norm, rel=3e-2), step


def test_bf16_zero1_trains_saves_resumes_and_exports_on_the_gpu(tmp_path: Path):
    examples, model_config = make_training_stage(tmp_path / "stage", num_train=256, num_valid=32)
    common = ["--examples", str(examples), "--model-config", str(model_config), "--num-gpus", "1",
              "--deepspeed-config", str(REPO / "deepspeed_configs/zero1_bf16.json"),
              "--global-batch-size", "16", "--micro-batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2",
              "--schedule-steps", "8", "--save-every", "2", "--no-progress"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    bertpipe("pretrain", *common, "--out", str(straight), "--max-steps", "8")
    bertpipe("pretrain", *common, "--out", str(resumed), "--max-steps", "4")
    bertpipe("pretrain", *common, "--out", str(resumed), "--max-steps", "8", "--resume")

    result = json.loads((resumed / "result.json").read_text())
    assert result["step"] == 8 and result["device"].startswith("cuda"), result
    ds_config = json.loads((resumed / "deepspeed_config.json").read_text())
    assert ds_config["bf16"]["enabled"] and ds_config["zero_optimization"]["stage"] == 1
    # GPU kernels (embedding backward, reductions) are not bitwise deterministic: equal within bf16 noise
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):  # the resumed steps
        assert b[step] == pytest.approx(a[step], rel=2e-2), (step, a[step], b[step])

    from safetensors.torch import load_file

    weights = load_file(resumed / "hf" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # the fp32 master weights, not bf16
    transformers = pytest.importorskip("transformers")
    model, info = transformers.BertForPreTraining.from_pretrained(resumed / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def _toy_task(path: Path) -> tuple[Path, Path, Path]:
    """A 2-layer random BERT with dropout off, and a task it can learn: label 1 iff "broncos" occurs."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from bert.model import BertConfig, BertModel

    words = ["the", "a", "of", "to", "in", "and", "won", "game", "clara", "denver", "broncos"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=100, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tokenizer.train_from_iterator([" ".join(words)] * 4, trainer)
    model_dir = path / "model"
    model_dir.mkdir(parents=True)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (model_dir / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab))
    (model_dir / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(model_dir)
    rng = random.Random(0)
    rows = []
    for i in range(160):
        sentence = [rng.choice(words[:-1]) for _ in range(8)]
        if i % 2:
            sentence[rng.randrange(8)] = "broncos"
        rows.append(f"{' '.join(sentence)}\t{i % 2}\n")
    (path / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows[:128]))
    (path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[128:]))
    return model_dir, path / "train.tsv", path / "dev.tsv"


def test_finetuning_runs_on_the_gpu_and_matches_the_cpu_in_fp32(tmp_path: Path):
    from bert.finetune import FinetuneConfig, main
    from bert.finetune.config import resolve_device

    model_dir, train, dev = _toy_task(tmp_path)

    def run(device: str, precision: str) -> dict:
        config = FinetuneConfig(task="sst2", model=model_dir, out=tmp_path / f"{device}-{precision}",
                                  train=train, eval=dev, seeds=(0,), epochs=6, batch_size=16, lr=1e-3,
                                  max_seq_length=32, warmup_ratio=0.0, progress=False, save_model=False,
                                  device=device, precision=precision)  # fmt: skip
        assert resolve_device(config)[0].type == device
        return main(config)["results"][0]

    cpu, gpu, bf16 = run("cpu", "fp32"), run("cuda", "fp32"), run("cuda", "bf16")
    for a, b in zip(cpu["epochs"], gpu["epochs"], strict=True):  # the same math: fp32 rounding apart
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3, abs=1e-4), (a, b)
    assert gpu["accuracy"] == pytest.approx(cpu["accuracy"], abs=1 / 32)
    assert bf16["epochs"][-1]["train_loss"] < 0.5 * bf16["epochs"][0]["train_loss"]  # bf16 learns too
    assert bf16["accuracy"] >= 0.9
