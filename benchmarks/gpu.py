"""GPU figures in one run (a few minutes on one GPU): prints JSON and a short table, writes OUT/gpu.json.

1. device: name, the bf16 matrix-product rate measured here (8192³, median of 10) and the datasheet peak;
2. step: BERT-base, 128 tokens, bf16 autocast: our training step against transformers.BertForPreTraining
   (SDPA) in the same process (benchmarks/pretrain_step.py): non-padding tokens/s, MFU, peak memory;
   then the same with torch.compile;
3. pretrain: `bertpipe pretrain` on 1 GPU with DeepSpeed ZeRO-1 bf16 (BERT-base, real examples), then a
   resume for a few more steps and the HF export loaded back: tokens/s from metrics.jsonl;
   pretrain_variants: the same run (no resume) eager (``compile: false``), and with every speed switch
   (torch.compile, vocabulary padded to 64, flash varlen attention with attention dropout 0, MosaicBERT's
   setting), each given as a TrainConfig JSON through ``--config``;
4. finetune: benchmarks/finetune_step.py on CoLA batches (32 and 128), ours and transformers', fp32
   and bf16: milliseconds per phase, steps/s;
5. tests: ``pytest -m gpu`` (tests/test_gpu.py).

Each part runs on its own (a failure is recorded, the next part still runs), and OUT/gpu.json is rewritten
after each, so a run stopped at its time limit keeps what it measured.

    python benchmarks/gpu.py --examples EXAMPLES_DIR --cola COLA_DIR --out OUT [--parts step,pretrain,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Dense bf16 peak by the vendors' datasheets (SXM parts), FLOP/s.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "L4": 121e12, "A10": 125e12, "B200": 2250e12}  # fmt: skip


def device_part(args) -> dict:
    name = torch.cuda.get_device_name()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    measured = 2 * 8192**3 / statistics.median(times)
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    return {
        "name": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16_matmul_tflops_measured": round(measured / 1e12, 1),
        "bf16_peak_tflops_datasheet": datasheet / 1e12 if datasheet else None,
    }


def step_part(args, compile_: bool) -> dict:
    import pretrain_step

    peak = args.peak_flops or DATASHEET_BF16.get(
        next((k for k in DATASHEET_BF16 if k in torch.cuda.get_device_name()), ""), 989e12
    )
    argv = ["--config", "base", "--device", "cuda", "--dtype", "bf16", "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--warmup", "5" if not compile_ else "3", "--peak-flops", str(peak)]  # fmt: skip
    if compile_:
        argv.append("--compile")
    started = time.perf_counter()
    report = pretrain_step.main(argv)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def bertpipe(*argv: str, log: Path) -> float:
    """Run a bertpipe command (python -m flows.cli), its output to ``log``; wall seconds; raises on failure."""
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "flows.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                              cwd=REPO, timeout=1200)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"bertpipe {argv[0]} exited {done.returncode}: {log.read_text()[-2000:]}")
    return time.perf_counter() - started


def pretrain_part(args) -> dict:
    run = args.work / "pretrain"
    common = ["--examples", str(args.examples), "--model-config", args.model, "--num-gpus", "1",
              "--deepspeed-config", str(REPO / "deepspeed_configs/zero1_bf16.json"),
              "--global-batch-size", str(args.batch_size), "--micro-batch-size", str(args.batch_size),
              "--lr", "1e-4", "--warmup-steps", "10", "--schedule-steps", "1000", "--save-every", "1000",
              "--no-progress", "--out", str(run)]  # fmt: skip
    first = bertpipe(
        "pretrain", *common, "--max-steps", str(args.pretrain_steps), log=args.out / "pretrain.log"
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    steady = train[5:] or train
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    mean_len = sum(r["tokens"] for r in steady) / sum(r["samples"] for r in steady)
    result = json.loads((run / "result.json").read_text())
    resumed = bertpipe("pretrain", *common, "--resume", "--max-steps", str(args.pretrain_steps + 10),
                       log=args.out / "pretrain-resume.log")  # fmt: skip
    after = json.loads((run / "result.json").read_text())
    from bert.model import BertConfig, BertForPreTraining

    hf = BertForPreTraining.from_pretrained(run / "hf")
    cfg = BertConfig.from_json_file(run / "hf")
    per_token = flops_per_token(cfg, mean_len)
    peak = args.peak_flops or 989e12
    return {
        "deepspeed": "ZeRO-1, bf16, 1 GPU, bertpipe pretrain (the deepspeed launcher)",
        "global_batch": args.batch_size,
        "steps": result["step"],
        "device": result.get("device"),
        "first_run_wall_s": round(first, 1),
        "median_step_s": round(statistics.median(r["step_time_s"] for r in steady), 4),
        "tokens_per_s": round(tokens_per_s),
        "mean_tokens_per_sequence": round(mean_len, 1),
        "approx_mfu": round(tokens_per_s * per_token / peak, 4),
        "loss_first_last": [round(train[0]["loss"], 3), round(train[-1]["loss"], 3)],
        "resumed_to_step": after["step"],
        "resume_wall_s": round(resumed, 1),
        "export_parameters": hf.num_parameters(),
        "export_dtype": str(next(hf.parameters()).dtype),
    }


def flops_per_token(cfg, mean_len: float) -> float:
    """Training FLOPs per non-padding token: 6 × the dense layers, attention over the mean length, MLM head."""
    per_token = (
        6 * cfg.num_hidden_layers * (4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size)
    )
    per_token += 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_len  # attention over the mean length
    per_token += (
        6 * (cfg.hidden_size**2 + cfg.hidden_size * cfg.vocab_size) * 0.15
    )  # MLM head, ~15% predicted
    return per_token


PRETRAIN_VARIANTS = {
    "eager": {"compile": False},
    "all_switches": {"compile": True, "model_overrides": {"pad_vocab_to_multiple_of": 64, "unpad_attention": "varlen",
                                                           "attention_probs_dropout_prob": 0.0}},
}  # fmt: skip


def pretrain_variants_part(args) -> dict:
    """`bertpipe pretrain` end to end through the launcher, once per PRETRAIN_VARIANTS entry (no resume)."""
    from bert.model import BertConfig

    out: dict = {}
    for name, settings in PRETRAIN_VARIANTS.items():
        run = args.work / f"pretrain-{name}"
        config_file = args.work / f"pretrain-{name}.json"
        config_file.write_text(json.dumps(settings))
        try:
            wall = bertpipe("pretrain", "--config", str(config_file), "--examples", str(args.examples),
                            "--model-config", args.model, "--num-gpus", "1",
                            "--deepspeed-config", str(REPO / "deepspeed_configs/zero1_bf16.json"),
                            "--global-batch-size", str(args.batch_size), "--micro-batch-size", str(args.batch_size),
                            "--lr", "1e-4", "--warmup-steps", "10", "--schedule-steps", "1000", "--save-every", "1000",
                            "--no-progress", "--out", str(run), "--max-steps", str(args.pretrain_steps),
                            log=args.out / f"pretrain-{name}.log")  # fmt: skip
        except Exception as e:  # one variant failing (no flash kernel, say) still leaves the others measured
            out[name] = {"settings": settings, "error": f"{type(e).__name__}: {e}"[-2000:]}
            continue
        train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in train if "tokens_per_s" in r]
        steady = train[5:] or train
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
        mean_len = sum(r["tokens"] for r in steady) / sum(r["samples"] for r in steady)
        cfg = BertConfig.from_json_file(run / "hf")
        out[name] = {
            "settings": settings,
            "wall_s": round(wall, 1),
            "median_step_s": round(statistics.median(r["step_time_s"] for r in steady), 4),
            "tokens_per_s": round(tokens_per_s),
            "approx_mfu": round(
                tokens_per_s * flops_per_token(cfg, mean_len) / (args.peak_flops or 989e12), 4
            ),
            "loss_first_last": [round(train[0]["loss"], 3), round(train[-1]["loss"], 3)],
        }
    return out


def finetune_model(args) -> Path:
    """The pretrain part's export, or (when that part did not run) a random BERT-base with the examples' vocab."""
    export = args.work / "pretrain" / "hf"
    if (export / "model.safetensors").exists():
        return export
    import shutil

    from bert.model import BertConfig, BertForPreTraining
    from bert.pretrain.data import vocab_dir_of

    model_dir = args.work / "base-random"
    vocab = vocab_dir_of(args.examples)
    tokens = (vocab / "vocab.txt").read_text(encoding="utf-8").splitlines()
    BertForPreTraining(BertConfig.preset("base", vocab_size=len(tokens))).save_pretrained(model_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (vocab / name).exists():
            shutil.copyfile(vocab / name, model_dir / name)
    return model_dir


def finetune_part(args) -> dict:
    """benchmarks/finetune_step.py on CoLA batches on the GPU: ours and transformers', fp32 and bf16."""
    model = finetune_model(args)
    out: dict = {}
    variants = [(32, "fp32"), (32, "bf16"), (128, "fp32"), (128, "bf16")]
    if args.finetune_variants:
        variants = [variants[int(i)] for i in args.finetune_variants.split(",")]
    for batch_size, precision in variants:
        name = f"{precision}-{batch_size}"
        log = args.out / f"finetune-{name}.log"
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, str(REPO / "benchmarks/finetune_step.py"), "--model", str(model),
                                   "--train", str(args.cola / "train.tsv"), "--device", "cuda", "--precision", precision,
                                   "--batch-size", str(batch_size), "--batches", "30", "--repeats", "1"],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=600)  # fmt: skip
        text = log.read_text()
        if done.returncode != 0:
            out[name] = {"error": text[-1500:]}
            continue
        report = json.loads(text[text.index("{") :])
        out[name] = {
            "bertpipe": report["runs"]["bertpipe"][0],
            "transformers": report["runs"]["transformers"][0],
            "steps_per_s": round(1000 / report["median_step_ms"]["bertpipe"], 1),
            "speedup": report["speedup"],
        }
    return out


def tests_part(args) -> dict:
    started = time.perf_counter()
    with open(args.out / "pytest-gpu.log", "w") as f:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                               "no:cacheprovider"], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=900)  # fmt: skip
    tail = (args.out / "pytest-gpu.log").read_text().strip().splitlines()[-1:]
    return {"returncode": done.returncode, "summary": tail[0] if tail else "", "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=Path, required=True, help="a finished examples stage (128 tokens)")
    p.add_argument("--cola", type=Path, required=True, help="directory with CoLA train.tsv and dev.tsv")
    p.add_argument("--out", type=Path, required=True, help="where gpu.json and the logs go")
    p.add_argument("--work", type=Path, default=Path("/tmp/bertpipe-gpu"), help="scratch: runs, checkpoints")
    p.add_argument("--parts", default="device,step,pretrain,finetune,tests,step_compile")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--model", default="base", help="model preset of the pretrain part (tiny: a CPU dry run)")
    p.add_argument("--steps", type=int, default=20, help="timed steps of the step benchmark")
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument(
        "--finetune-variants", default="", help="indices into the fine-tuning variants (default: all)"
    )
    p.add_argument("--peak-flops", type=float, default=None, help="default: the datasheet's dense bf16 peak")
    args = p.parse_args()
    if not torch.cuda.is_available() and {"device", "step", "step_compile"} & set(args.parts.split(",")):
        sys.exit("benchmarks/gpu.py needs a CUDA device (only --parts pretrain,finetune run on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = {
        "device": lambda: device_part(args),
        "step": lambda: step_part(args, compile_=False),
        "pretrain": lambda: pretrain_part(args),
        "pretrain_variants": lambda: pretrain_variants_part(args),
        "finetune": lambda: finetune_part(args),
        "tests": lambda: tests_part(args),
        "step_compile": lambda: step_part(args, compile_=True),
    }
    report: dict = {"benchmark": "gpu", "parts": {}}
    for name in args.parts.split(","):
        started = time.perf_counter()
        try:
            report["parts"][name] = parts[name]()
        except Exception as e:  # record it and go on: the other parts still measure
            report["parts"][name] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:],
            }
        report["parts"][name]["part_wall_s"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
        print(f"== {name}: {json.dumps(report['parts'][name])[:1500]}", flush=True)
    print(json.dumps(report, indent=2))
    summary(report)


def summary(report: dict) -> None:
    """The few figures that matter, last in the output."""
    parts = report["parts"]
    for name in ("step", "step_compile"):
        for r in (parts.get(name) or {}).get("results", []):
            ours, theirs = r.get("bertpipe", {}), r.get("transformers", {})
            print(f"{name}: ours {ours.get('tokens_per_s')} tok/s MFU {ours.get('mfu')} peak {ours.get('peak_memory_gib')} GiB | "
                  f"transformers {theirs.get('tokens_per_s')} tok/s MFU {theirs.get('mfu')} | x{r.get('speedup_vs_transformers')}")  # fmt: skip
    pre = parts.get("pretrain") or {}
    print(f"pretrain: {pre.get('tokens_per_s')} tok/s, MFU~{pre.get('approx_mfu')}, resumed to {pre.get('resumed_to_step')}, {pre.get('error', '')}")  # fmt: skip
    for name, variant in (parts.get("pretrain_variants") or {}).items():
        if isinstance(variant, dict):
            print(f"pretrain {name}: {variant.get('tokens_per_s')} tok/s, MFU~{variant.get('approx_mfu')} {variant.get('error', '')[:200]}")  # fmt: skip
    print(f"finetune: {json.dumps(parts.get('finetune'))[:300]}")
    print(f"tests: {json.dumps(parts.get('tests'))[:300]}")


if __name__ == "__main__":
    main()
