"""GPU figures in one run, within a time budget: prints JSON and a short table, writes OUT/gpu.json.

Parts, in order of importance (``--parts``; each skipped, with its reason in the JSON, when what is left of
``--budget-s`` cannot cover its conservative estimate, see ``gpu_e2e.Budget``):

1. device: name, the bf16 matrix-product rate measured here (8192³, median of 10: the ceiling) and the
   datasheet peak;
2. e2e, ``CONFIG/SIDE`` for CONFIG in base-128, large-128, base-512, large-512 (``gpu_e2e.E2E_CONFIGS``: global
   batch 256, 256, 64, 32, micro = global, no accumulation): ``ours`` is `bertpipe pretrain` end to end
   (``python -m flows.cli pretrain``: the launcher, DeepSpeed ZeRO-1 bf16, 1 GPU) with the product's fast
   settings (torch.compile, vocabulary padded to 64, varlen attention with attention dropout 0);
   ``transformers`` is transformers.BertForPreTraining (SDPA) in a plain loop (fused AdamW, bf16 autocast) on
   the same batches; ``base-128/eager`` is ours without torch.compile and with the stock model;
   ``base-128/bf16-accumulation`` is ours with the shipped ZeRO-1 bf16 JSON less its fp32 gradient
   accumulation (DeepSpeed's ZeRO optimizer instead of its BF16_Optimizer: the A/B of that choice);
   ``base-128/aten-rng``, ``cpp-wrapper``, ``tuned``, ``cudagraphs``, ``no-dropout`` and ``autotune`` are ours
   with other settings (``gpu_e2e.VARIANTS``: dropout masks from torch's random kernel; kernel launches from
   C++; coordinate-descent kernel tuning; Inductor's CUDA graphs over batches packed to a multiple of 1024
   tokens; hidden dropout 0; Triton matrix-product templates with bias and GELU fused in). Per run:
   real-token tokens/s (median over the steps past the warmup), MFU, peak GPU memory, data_wait share (ours),
   and per config the ratio ours / transformers (benchmarks/gpu_e2e.py says how each side is timed);
   layer (after base-128's profile): benchmarks/layer_kernels.py, one BERT-base encoder layer compiled alone
   under each Inductor setting (forward + backward ms and its top kernels, seconds a setting);
   overhead: benchmarks/step_overhead.py on the GPU (the host's launches, syncs and time per step under
   each DeepSpeed JSON, a narrow model with BERT-base's parameter tensors);
3. step: BERT-base, 128 tokens, bf16 autocast: our training step against transformers.BertForPreTraining
   (SDPA) in the same process (benchmarks/pretrain_step.py): non-padding tokens/s, MFU, peak memory;
   step_compile: the same with torch.compile;
4. pretrain: `bertpipe pretrain` (BERT-base, --examples), then a resume for a few more steps and the HF
   export loaded back; pretrain_variants: the same run (no resume) eager and with every speed switch;
5. finetune (needs --cola): benchmarks/finetune_step.py on CoLA batches (32 and 128), ours and transformers',
   fp32 and bf16: milliseconds per phase, steps/s;
6. tests: ``pytest -m gpu`` (tests/test_gpu.py).

MFU, one formula everywhere: tokens/s × ``flops_per_token(config, mean tokens per sequence)`` / peak, real
(non-padding) tokens only: 6 × L × (4H² + 2HF) per token for the dense layers (forward + backward),
12 × L × H × mean length for attention, 6 × (H² + HV) × 0.15 for the MLM head (15% of the tokens predicted).
``mfu`` is against the datasheet's dense bf16 peak (``--peak-flops`` overrides it), ``mfu_of_measured_bf16_rate``
against the device part's measured matrix-product rate.

Inputs: ``--examples`` (128 tokens) and ``--examples-512``, or ``--corpus-shards`` + ``--vocab`` (a shard and
a vocab stage: the examples are made here), or ``--make-corpus-mb N`` (a synthetic corpus of N MB through
shard, vocab and examples, from this repository alone). ``--dry-run``: the same code paths on the CPU with
the tiny model, a few steps and small batches (plumbing only: its JSON says ``"device": "cpu"``).

Each part runs on its own (a failure is recorded, the next part still runs), and OUT/gpu.json is rewritten
after each, so a run stopped at its time limit keeps what it measured; the logs go to OUT/logs.tar.gz.

    python benchmarks/gpu.py --make-corpus-mb 9 --workers 8 --out OUT [--budget-s 480] [--parts device,base-128/ours,...]
    python benchmarks/gpu.py --examples EXAMPLES_DIR --examples-512 DIR --cola COLA_DIR --out OUT
    python benchmarks/gpu.py --dry-run --make-corpus-mb 9 --workers 1 --budget-s 3000 --out /tmp/gpu-bench-dry  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

import gpu_e2e  # noqa: E402

# Dense bf16 peak by the vendors' datasheets (SXM parts), FLOP/s.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "L4": 121e12, "A10": 125e12, "B200": 2250e12}  # fmt: skip


def device_part(args) -> dict:
    """The device and its measured bf16 matrix-product rate (the ceiling); on the CPU (dry run) a 1024³ one."""
    if args.device == "cpu":
        import platform

        n = 1024
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        a @ b
        times = []
        for _ in range(5):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        return {
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_size": n,
            "bf16_matmul_tflops_measured": round(2 * n**3 / statistics.median(times) / 1e12, 4),
            "bf16_peak_tflops_datasheet": None,
        }
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
    datasheet = datasheet_peak()
    del a, b
    torch.cuda.empty_cache()  # the bertpipe runs after this one need the memory
    return {
        "name": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_size": 8192,
        "bf16_matmul_tflops_measured": round(measured / 1e12, 1),
        "bf16_peak_tflops_datasheet": datasheet / 1e12 if datasheet else None,
    }


def datasheet_peak() -> float | None:
    """The dense bf16 peak of this CUDA device by its datasheet (FLOP/s); None on the CPU or when unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


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


def overhead_part(args) -> dict:
    """benchmarks/step_overhead.py on this device: the host's work per step under each DeepSpeed JSON."""
    import step_overhead

    started = time.perf_counter()
    report = step_overhead.main(["--device", args.device])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


LAYER_BUDGET_S = 150.0  # the layer part's own limit: its settings past it are skipped, autotune last


def layer_part(args) -> dict:
    """benchmarks/layer_kernels.py on this device: one BERT-base layer's forward + backward under each Inductor
    setting (seconds each, where an e2e A/B costs ~85 s); on a dry run a narrow layer, without autotune. In a
    process of its own: a compilation that crashes or overruns (autotune) costs only its own results."""
    out = args.work / "layer_kernels.json"
    out.unlink(missing_ok=True)
    budget = min(LAYER_BUDGET_S, left(args))
    argv = ["--device", args.device, "--budget-s", str(budget), "--out", str(out)]
    if args.dry_run:
        argv += ["--tokens", "512", "--hidden", "64", "--heads", "2", "--iters", "3",
                 "--variants", "default,aten-rng,no-dropout,eager"]  # fmt: skip
    command = [sys.executable, str(REPO / "benchmarks" / "layer_kernels.py"), *argv]
    try:
        gpu_e2e.run_logged(command, args.logs / "layer_kernels.log", min(budget + 60, left(args)))
    except (TimeoutError, RuntimeError) as e:
        if not out.exists():
            raise
        return {**json.loads(out.read_text()), "cut_short": str(e)[:500]}
    return json.loads(out.read_text())


def bertpipe(*argv: str, log: Path, timeout_s: float = 1200) -> float:
    """Run a bertpipe command (python -m flows.cli), its output to ``log``; wall seconds; raises on failure
    (and past ``timeout_s``, the launcher's whole process tree killed)."""
    return gpu_e2e.run_logged(gpu_e2e.bertpipe_command(*argv), log, timeout_s)


def left(args) -> float:
    """Seconds of the time budget left (what a part's subprocess may take at most)."""
    return max(1.0, args.budget.remaining())


def pretrain_part(args) -> dict:
    run = args.work / "pretrain"
    common = ["--examples", str(args.examples), "--model-config", args.model, "--num-gpus", "1",
              "--deepspeed-config", str(REPO / "deepspeed_configs/zero1_bf16.json"),
              "--global-batch-size", str(args.batch_size), "--micro-batch-size", str(args.batch_size),
              "--lr", "1e-4", "--warmup-steps", "10", "--schedule-steps", "1000", "--save-every", "1000",
              "--no-progress", "--out", str(run)]  # fmt: skip
    first = bertpipe(
        "pretrain",
        *common,
        "--max-steps",
        str(args.pretrain_steps),
        log=args.logs / "pretrain.log",
        timeout_s=left(args),
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    steady = train[5:] or train
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    mean_len = sum(r["tokens"] for r in steady) / sum(r["samples"] for r in steady)
    result = json.loads((run / "result.json").read_text())
    resumed = bertpipe("pretrain", *common, "--resume", "--max-steps", str(args.pretrain_steps + 10),
                       log=args.logs / "pretrain-resume.log", timeout_s=left(args))  # fmt: skip
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


PRETRAIN_VARIANTS = {"eager": gpu_e2e.EAGER_SETTINGS, "all_switches": gpu_e2e.FAST_SETTINGS}


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
                            log=args.logs / f"pretrain-{name}.log", timeout_s=left(args))  # fmt: skip
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
        log = args.logs / f"finetune-{name}.log"
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, str(REPO / "benchmarks/finetune_step.py"), "--model", str(model),
                                   "--train", str(args.cola / "train.tsv"), "--device", "cuda", "--precision", precision,
                                   "--batch-size", str(batch_size), "--batches", "30", "--repeats", "1"],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=left(args))  # fmt: skip
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
    with open(args.logs / "pytest-gpu.log", "w") as f:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                               "no:cacheprovider"], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=left(args))  # fmt: skip
    tail = (args.logs / "pytest-gpu.log").read_text().strip().splitlines()[-1:]
    return {"returncode": done.returncode, "summary": tail[0] if tail else "", "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


# --- end to end: ours against transformers, on the same batches -----------------------------------------

E2E_PARTS = [f"{c}/{side}" for c in gpu_e2e.E2E_CONFIGS for side in ("ours", "transformers")]
PROFILE_PART = "base-128/profile"
# ours with the shipped ZeRO-1 bf16 JSON less its fp32 gradient accumulation (DeepSpeed's ZeRO optimizer)
ACCUMULATION_PART = "base-128/bf16-accumulation"
# ours with other settings (gpu_e2e.VARIANTS)
VARIANT_PARTS = [f"base-128/{side}" for side in gpu_e2e.VARIANTS]
DEFAULT_PARTS = ["device", *E2E_PARTS[:2], PROFILE_PART, "layer", *VARIANT_PARTS, "overhead", ACCUMULATION_PART, *E2E_PARTS[2:],
                 "base-128/eager", "step", "pretrain",
                 "pretrain_variants", "finetune", "tests", "step_compile"]  # fmt: skip
# what a dry run (the CPU check of the plumbing) runs unless --parts names others
DRY_RUN_PARTS = ("device", *E2E_PARTS, PROFILE_PART, "layer", *VARIANT_PARTS, "overhead", ACCUMULATION_PART,
                 "base-128/eager")  # fmt: skip
PROFILE_STEPS = (21, 24)  # profiled steps of the profile part's run (it stops after the last)
CUDA_ONLY = {"step", "step_compile", "tests"}
DRY_RUN_SHAPES = {"base-128": ("tiny", 128, 8), "large-128": ("tiny", 128, 8), "base-512": ("tiny", 512, 4),
                  "large-512": ("tiny", 512, 4)}  # fmt: skip
MFU_FORMULA = (
    "tokens_per_s * flops_per_token / peak; flops_per_token = 6*L*(4*H^2 + 2*H*F) + 12*L*H*mean_len "
    "+ 6*(H^2 + H*V)*0.15 (real tokens only; mean_len = real tokens per sequence); peak = datasheet dense bf16 "
    "(mfu) or the device part's measured bf16 matmul rate (mfu_of_measured_bf16_rate)"
)


def e2e_shapes(args) -> dict[str, tuple[str, int, int]]:
    """(model preset, tokens per example, global batch) of each e2e config: the H200 ones, tiny ones dry."""
    shapes = dict(DRY_RUN_SHAPES if args.dry_run else gpu_e2e.E2E_CONFIGS)
    for item in filter(None, args.e2e_batch.split(",")):
        name, _, size = item.partition("=")
        if name not in shapes or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--e2e-batch {item!r}: write CONFIG=SIZE with CONFIG one of {list(shapes)}")
        shapes[name] = (*shapes[name][:2], int(size))
    return shapes


def e2e_budget_shapes(args) -> dict[str, gpu_e2e.Shape]:
    """Each e2e config's layers, weights and step FLOPs (full-length examples), for the budget's estimates."""
    from bert.model import BertConfig

    shapes = {}
    for name, (model, seq_len, batch) in e2e_shapes(args).items():
        cfg = BertConfig.preset(model, vocab_size=args.vocab_size)
        weights = cfg.num_hidden_layers * (
            4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size
        )
        weights += cfg.vocab_size * cfg.hidden_size
        step_flops = batch * seq_len * flops_per_token(cfg, seq_len)
        shapes[name] = gpu_e2e.Shape(cfg.num_hidden_layers, weights, step_flops)
    return shapes


def e2e_part(args, report: dict, part: str) -> dict:
    """One e2e run, ``CONFIG/SIDE`` (SIDE: ours, one of ``gpu_e2e.VARIANTS``, bf16-accumulation, eager
    or transformers), with its MFU figures."""
    from types import SimpleNamespace

    config, side = part.split("/")
    model, seq_len, batch = e2e_shapes(args)[config]
    examples = args.examples if seq_len == 128 else args.examples_512
    if examples is None:
        raise ValueError(
            f"{part} needs {seq_len}-token examples: give --examples (128) and --examples-512, --corpus-shards with --vocab, or --make-corpus-mb N"
        )
    steps, warmup = args.e2e_steps, args.e2e_warmup
    name = part.replace("/", "-")
    if side == "profile":
        return profile_part(args, name, examples, model, batch, config)
    deepspeed_config = gpu_e2e.ZERO1_BF16
    if side == "bf16-accumulation":
        deepspeed_config = gpu_e2e.bf16_accumulation_config(args.work)
    if side == "transformers":
        result = gpu_e2e.run_transformers(name, examples, model, batch, steps, warmup, args.device, args.work,
                                          left(args))  # fmt: skip
    else:
        fast = side in ("ours", "bf16-accumulation", *gpu_e2e.VARIANTS)
        variant = side
        if side == "ours" and config != "base-128" and args.adopted:
            variant = args.adopted[0]  # --adopt: base-128's fastest model-preserving variant
        settings = (
            gpu_e2e.variant_settings(variant) if fast else json.loads(json.dumps(gpu_e2e.EAGER_SETTINGS))
        )
        substitutions = (
            dry_run_substitutions(settings, config, compile_ok=side == "ours") if args.dry_run else {}
        )
        result = gpu_e2e.run_ours(name, examples, model, batch, steps, warmup, settings, args.work, left(args),
                                  deepspeed_config)  # fmt: skip
        if substitutions:
            result["dry_run_substitutions"] = substitutions
        if variant != side:
            result["adopted_variant"] = variant
    cfg = SimpleNamespace(**result.pop("_config"))
    result.update(model=model, max_seq_length=seq_len, examples=str(examples))
    result["flops_per_token"] = round(flops_per_token(cfg, result["mean_tokens_per_sequence"]))
    device = report["parts"].get("device") or {}
    measured = device.get("bf16_matmul_tflops_measured")
    result.update(gpu_e2e.mfu_figures(result["tokens_per_s"], result["flops_per_token"], args.peak_flops or datasheet_peak(),
                                      measured * 1e12 if measured else None))  # fmt: skip
    return result


def profile_part(args, name: str, examples: Path, model: str, batch: int, config: str) -> dict:
    """Ours with the fast settings, torch.profiler over steps ``PROFILE_STEPS`` (``--profile-steps``): the
    rank's summary (device busy share, kernel time by kind, top operators); its Chrome trace goes to the logs."""
    settings = json.loads(json.dumps(gpu_e2e.FAST_SETTINGS))
    settings["profile_steps"] = "{}:{}".format(*PROFILE_STEPS)
    substitutions = dry_run_substitutions(settings, config) if args.dry_run else {}
    result = gpu_e2e.run_ours(name, examples, model, batch, PROFILE_STEPS[1], PROFILE_STEPS[0] - 1, settings,
                              args.work, left(args))  # fmt: skip
    profile = args.work / "runs" / name / "profile" / "rank0"
    summary = json.loads((profile / "summary.json").read_text())
    shutil.copyfile(profile / "trace.json", args.logs / f"{name}.trace.json")
    shutil.copyfile(profile / "table.txt", args.logs / f"{name}.table.txt")
    result.pop("_config", None)
    keep = ("side", "settings", "device", "steps", "global_batch", "wall_s", "median_step_s")
    return {**{k: result[k] for k in keep if k in result}, "profile": summary,
            **({"dry_run_substitutions": substitutions} if substitutions else {})}  # fmt: skip


def dry_run_substitutions(settings: dict, config: str, compile_ok: bool = True) -> dict:
    """Change ``settings`` in place for the CPU; what was changed. Flash varlen attention has no CPU kernel
    (the reference path instead), and inductor takes ~3 min a run on two cores: base-128's ours alone compiles."""
    overrides = settings.get("model_overrides", {})
    changed = {k: v for k, v in gpu_e2e.CPU_SUBSTITUTIONS.items() if k in overrides}
    overrides.update(changed)
    if settings.get("compile") and (config != "base-128" or not compile_ok):
        settings["compile"] = changed["compile"] = False
        if settings.pop("compile_options", None):  # settings of the compilation there no longer is
            changed["compile_options"] = {}
    return changed


SIDES = ("ours", *gpu_e2e.VARIANTS, "bf16-accumulation", "eager", "transformers")  # transformers last


def e2e_summary(report: dict) -> dict:
    """Per e2e config: ours and transformers' tokens/s, MFU, peak memory and the ratio ours / transformers."""
    out: dict = {}
    for config in gpu_e2e.E2E_CONFIGS:
        row: dict = {}
        for side in SIDES:
            r = report["parts"].get(f"{config}/{side}") or {}
            if "tokens_per_s" in r:
                row[side] = {k: r.get(k) for k in ("tokens_per_s", "mfu", "mfu_of_measured_bf16_rate",
                                                   "peak_memory_gib", "peak_reserved_gib", "peak_host_rss_gib", "data_wait_share", "median_step_s",
                                                   "global_batch")}  # fmt: skip
                if "adopted_variant" in r:
                    row[side]["adopted_variant"] = r["adopted_variant"]
            elif r:
                row[side] = {"not_measured": r.get("skipped") or (r.get("error") or "")[:300]}
        theirs = (row.get("transformers") or {}).get("tokens_per_s")
        for side in SIDES[:-1]:
            mine = (row.get(side) or {}).get("tokens_per_s")
            if mine and theirs:
                row[f"{side}_vs_transformers"] = round(mine / theirs, 2)
        if row:
            out[config] = row
    return out


def prepare_inputs(args) -> dict:
    """The 128- and 512-token example directories: given, made from given shards and vocab, or from a
    synthetic corpus made here (``--make-corpus-mb``); sets ``args.examples`` / ``args.examples_512``."""
    made: dict = {}
    corpus, vocab = args.corpus_shards, args.vocab
    need_128 = args.examples is None
    need_512 = args.examples_512 is None and any(
        p.split("/")[0].endswith("-512") for p in args.part_list if "/" in p
    )
    if not (need_128 or need_512):
        return made
    if corpus is None and args.make_corpus_mb:
        made["corpus"] = gpu_e2e.make_corpus(args.work / "inputs", args.make_corpus_mb, args.vocab_size,
                                             args.workers, left(args))  # fmt: skip
        corpus, vocab = Path(made["corpus"]["corpus"]), Path(made["corpus"]["vocab"])
    if corpus is None or vocab is None:
        if need_128:
            raise ValueError(
                "no examples: give --examples (and --examples-512), --corpus-shards with --vocab, or --make-corpus-mb N"
            )
        return made
    for seq_len, needed, attr in ((128, need_128, "examples"), (512, need_512, "examples_512")):
        if needed:
            out = args.work / "inputs" / f"examples-{seq_len}"
            made[f"examples_{seq_len}"] = gpu_e2e.make_examples(
                corpus, vocab, out, seq_len, args.workers, left(args)
            )
            setattr(args, attr, out)
    return made


RUNTIME_PACKAGES = ("torch", "deepspeed", "transformers", "pydantic", "pyarrow", "tokenizers", "typer", "rensa",
                    "sentencex", "zstandard", "hjson", "safetensors", "numpy")  # fmt: skip


def environment() -> dict:
    """Python and the versions of the packages the parts need ("missing" where one is not installed)."""
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in RUNTIME_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def skip_reason(args, part: str, report: dict | None = None) -> str | None:
    """Why ``part`` does not run: no CUDA for it, no CoLA, not part of a dry run, its bertpipe counterpart
    skipped (a transformers run alone has nothing to be compared with), or the time budget."""
    if part in CUDA_ONLY and args.device != "cuda":
        return "needs a CUDA device"
    if part == "finetune" and args.cola is None:
        return "no --cola given"
    if args.dry_run and not args.parts_given and part not in DRY_RUN_PARTS:
        return "dry run: the CPU check covers the device and e2e parts (name others in --parts to run them)"
    if part.endswith("/transformers"):
        ours = ((report or {}).get("parts") or {}).get(part.replace("/transformers", "/ours")) or {}
        if "skipped" in ours:
            return f"its bertpipe counterpart was skipped ({ours['skipped']})"
    return args.budget.skip_reason(part)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=Path, default=None, help="a finished examples stage (128 tokens)")
    p.add_argument("--examples-512", type=Path, default=None, help="a finished examples stage (512 tokens)")
    p.add_argument(
        "--corpus-shards", type=Path, default=None, help="a finished shard stage: examples made from it"
    )
    p.add_argument("--vocab", type=Path, default=None, help="the vocab stage for --corpus-shards")
    p.add_argument("--make-corpus-mb", type=float, default=0, help="make a synthetic corpus of this many MB")
    p.add_argument(
        "--vocab-size", type=int, default=30522, help="of the vocabulary made with --make-corpus-mb"
    )
    p.add_argument("--workers", type=int, default=4, help="processes of the shard and examples stages")
    p.add_argument(
        "--cola", type=Path, default=None, help="directory with CoLA train.tsv and dev.tsv (finetune)"
    )
    p.add_argument("--out", type=Path, required=True, help="where gpu.json and logs.tar.gz go")
    p.add_argument("--work", type=Path, default=Path("/tmp/bertpipe-gpu"), help="scratch: inputs, runs, logs")
    p.add_argument(
        "--parts", default=None, help="comma-separated, in order (default: " + ",".join(DEFAULT_PARTS) + ")"
    )
    p.add_argument(
        "--adopt",
        default=None,
        choices=("auto", *gpu_e2e.ADOPTABLE),
        help="run the other configs' ours with a variant of ours that keeps the model: 'auto', base-128's "
        f"fastest measured in this run when it beat base-128/ours by {gpu_e2e.ADOPT_MIN_GAIN}x "
        "(gpu_e2e.best_variant), or one named (what an earlier call found); the JSON's 'adopted'",
    )
    p.add_argument(
        "--budget-s", type=float, default=480, help="wall seconds for the whole run, inputs included"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="the CPU, the tiny model, a few steps: plumbing only"
    )
    p.add_argument(
        "--e2e-steps", type=int, default=None, help="steps of each e2e run (default 50; dry run 3)"
    )
    p.add_argument(
        "--e2e-warmup", type=int, default=None, help="first steps left out (default 30; dry run 1)"
    )
    p.add_argument("--e2e-batch", default="", help="global batch overrides, e.g. large-512=16,base-128=128")
    p.add_argument("--batch-size", type=int, default=256, help="of the step and pretrain parts")
    p.add_argument(
        "--model", default=None, help="model preset of the pretrain part (default base; dry run tiny)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps of the step benchmark")
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument(
        "--finetune-variants", default="", help="indices into the fine-tuning variants (default: all)"
    )
    p.add_argument("--peak-flops", type=float, default=None, help="default: the datasheet's dense bf16 peak")
    args = p.parse_args(argv)
    args.parts_given = args.parts is not None
    # (variant, gain): named by --adopt, or found by --adopt auto
    args.adopted = (args.adopt, None) if args.adopt not in (None, "auto") else None
    args.part_list = (args.parts or ",".join(DEFAULT_PARTS)).split(",")
    unknown = [x for x in args.part_list if x not in DEFAULT_PARTS]
    if unknown:
        p.error(f"unknown parts {unknown}: choose from {','.join(DEFAULT_PARTS)}")
    args.e2e_steps = args.e2e_steps or (3 if args.dry_run else 50)
    args.e2e_warmup = args.e2e_warmup if args.e2e_warmup is not None else (1 if args.dry_run else 30)
    if args.e2e_warmup >= args.e2e_steps:
        p.error(
            f"--e2e-warmup {args.e2e_warmup} leaves none of --e2e-steps {args.e2e_steps} to time: run more steps"
        )
    args.model = args.model or ("tiny" if args.dry_run else "base")
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"  # the ranks, and DeepSpeed here, on the CPU even beside a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the parts in order within the budget; OUT/gpu.json after each; the summary table last."""
    args = parse_args(argv)
    args.budget = gpu_e2e.Budget(args.budget_s, e2e_budget_shapes(args))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (--dry-run checks its plumbing on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.logs = args.work / "logs"
    args.logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "gpu", "device": args.device, "dry_run": args.dry_run, "budget_s": args.budget_s,
                    "mfu_formula": MFU_FORMULA, "e2e_steps": args.e2e_steps, "e2e_warmup_steps": args.e2e_warmup,
                    "e2e_shapes": {k: {"model": m, "max_seq_length": n, "global_batch": b, "micro_batch": b}
                                   for k, (m, n, b) in e2e_shapes(args).items()},
                    "environment": environment(), "parts": {},
                    "adopted": args.adopted and {"variant": args.adopted[0], "named": True}}  # fmt: skip
    started = time.perf_counter()
    try:
        report["inputs"] = prepare_inputs(args)
    except Exception as e:  # without examples only the device part can run
        report["inputs"] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
    report["inputs"]["wall_s"] = round(time.perf_counter() - started, 1)
    parts = {
        "device": lambda: device_part(args),
        "step": lambda: step_part(args, compile_=False),
        "pretrain": lambda: pretrain_part(args),
        "pretrain_variants": lambda: pretrain_variants_part(args),
        "finetune": lambda: finetune_part(args),
        "tests": lambda: tests_part(args),
        "step_compile": lambda: step_part(args, compile_=True),
        "overhead": lambda: overhead_part(args),
        "layer": lambda: layer_part(args),
    }
    for name in args.part_list:
        started = time.perf_counter()
        reason = skip_reason(args, name, report)
        if reason is not None:
            report["parts"][name] = {"skipped": reason}
        else:
            try:
                report["parts"][name] = parts[name]() if name in parts else e2e_part(args, report, name)
            except Exception as e:  # record it and go on: the other parts still measure
                report["parts"][name] = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            args.budget.record(name, time.perf_counter() - started, report["parts"][name])
            if args.adopt == "auto" and name.startswith("base-128/"):
                args.adopted = gpu_e2e.best_variant(report["parts"])
                report["adopted"] = args.adopted and {"variant": args.adopted[0], "gain": args.adopted[1]}
        report["parts"][name]["part_wall_s"] = round(time.perf_counter() - started, 1)
        report["e2e"] = e2e_summary(report)
        report["budget_left_s"] = round(args.budget.remaining(), 1)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
        print(f"== {name}: {json.dumps(report['parts'][name])[:1500]}", flush=True)
    pack_logs(args.work, args.out / "logs.tar.gz")
    print(json.dumps(report, indent=2))
    summary(report)
    return report


def pack_logs(work: Path, target: Path) -> None:
    """The runs' logs and metrics.jsonl files as one archive (the device tool brings back 8 files at most)."""
    import tarfile

    with tarfile.open(target, "w:gz") as tar:
        for folder in (work / "inputs" / "logs", work / "logs"):
            for path in sorted(folder.glob("*")):
                tar.add(path, arcname=f"{folder.relative_to(work)}/{path.name}")


def summary(report: dict) -> None:
    """The few figures that matter, last in the output: one line each."""
    parts = report["parts"]
    device = parts.get("device") or {}
    print(f"device: {report.get('device')} {device.get('name')}, bf16 matmul {device.get('bf16_matmul_tflops_measured')} "
          f"TFLOP/s measured, datasheet {device.get('bf16_peak_tflops_datasheet')}; dry run: {report.get('dry_run')}")  # fmt: skip
    for config, row in (report.get("e2e") or {}).items():
        cells = []
        for side in SIDES:
            r = row.get(side)
            if r is None:
                continue
            if "tokens_per_s" in r:
                cells.append(f"{side} {r['tokens_per_s']} tok/s MFU {r['mfu']} ({r['mfu_of_measured_bf16_rate']} of measured) "
                             f"peak {r.get('peak_memory_gib')} GiB (host {r.get('peak_host_rss_gib')}) wait {r.get('data_wait_share')}")  # fmt: skip
            else:
                cells.append(f"{side} not measured: {r['not_measured'][:80]}")
        ratios = " ".join(f"{k} x{v}" for k, v in row.items() if k.endswith("_vs_transformers"))
        print(f"e2e {config}: " + " | ".join(cells) + (f" | {ratios}" if ratios else ""))
    prof = (parts.get(PROFILE_PART) or {}).get("profile")
    if prof:
        print(f"profile {PROFILE_PART}: {prof['wall_ms_per_step']} ms a step, busy {prof['busy_share']}, ms by kind "
              f"{prof['ms_per_step_by_kind']}")  # fmt: skip
    for name, r in ((parts.get("overhead") or {}).get("results") or {}).items():
        print(f"overhead {name} ({r.get('optimizer')}): {r.get('median_step_ms')} ms a step, {r.get('launches_per_step')} "
              f"launches, {r.get('syncs_per_step')} syncs")  # fmt: skip
    for name in ("step", "step_compile"):
        for r in (parts.get(name) or {}).get("results", []):
            ours, theirs = r.get("bertpipe", {}), r.get("transformers", {})
            print(f"{name}: ours {ours.get('tokens_per_s')} tok/s MFU {ours.get('mfu')} peak {ours.get('peak_memory_gib')} GiB | "
                  f"transformers {theirs.get('tokens_per_s')} tok/s MFU {theirs.get('mfu')} | x{r.get('speedup_vs_transformers')}")  # fmt: skip
    for name, r in parts.items():
        if "skipped" in r:
            print(f"{name}: skipped: {r['skipped']}")
    pre = parts.get("pretrain") or {}
    if pre and "skipped" not in pre:
        print(f"pretrain: {pre.get('tokens_per_s')} tok/s, MFU~{pre.get('approx_mfu')}, resumed to {pre.get('resumed_to_step')}, {pre.get('error', '')}")  # fmt: skip
    for name, variant in (parts.get("pretrain_variants") or {}).items():
        if isinstance(variant, dict):
            print(f"pretrain {name}: {variant.get('tokens_per_s')} tok/s, MFU~{variant.get('approx_mfu')} {variant.get('error', '')[:200]}")  # fmt: skip
    for name in ("finetune", "tests"):
        if name in parts and "skipped" not in parts[name]:
            print(f"{name}: {json.dumps(parts.get(name))[:300]}")


if __name__ == "__main__":
    main()
