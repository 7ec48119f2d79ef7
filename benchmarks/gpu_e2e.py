"""`bertpipe pretrain` end to end against transformers' BertForPreTraining in a plain loop, on the same batches.

The pieces benchmarks/gpu.py runs as its e2e parts (``base-128/ours``, ``base-128/transformers``, ...):

- inputs: a synthetic corpus (benchmarks/scale.py's generator, its documents joined in groups so that 512-token
  examples fill up as real articles do) through ``bertpipe shard``, ``vocab`` and ``examples`` at 128 and
  512 tokens, or examples (or shards and a vocabulary) given;
- ours: ``python -m flows.cli pretrain`` (the launcher, DeepSpeed ZeRO-1 bf16, 1 GPU), the product's fast
  settings as a TrainConfig JSON (``FAST_SETTINGS``: torch.compile, vocabulary padded to 64, varlen
  attention with attention dropout 0), or eager; step times, tokens and ``data_wait`` from metrics.jsonl;
- transformers: ``python benchmarks/gpu_e2e.py transformers ...``: ``transformers.BertForPreTraining`` (SDPA
  attention, stock dropout), fused AdamW, bf16 autocast, gradient clipping at 1.0, over the batches
  bertpipe's own RankBatches + Collator give for the same examples, seed and global batch; they are collated
  (and pinned) before the timed loop, so the baseline never waits for data;
- peak memory of a rank: a ``sitecustomize`` put first on the ranks' PYTHONPATH (``PEAK_HOOK``) writes
  ``torch.cuda.max_memory_allocated`` and the host's max RSS at exit (it runs any sitecustomize it shadows);
  the rank's metrics.jsonl also logs ``peak_memory_gib`` on CUDA, the same counter, as the run goes.

Both sides are timed alike: per step, from asking for the batch until the step is queued and the previous
step's loss is read back on the host (bertpipe reads a logged step's metrics once the next step is queued,
and logs every step at ``log_every`` 1); the first ``warmup`` steps (compilation) are left out; tokens/s is
the median over the timed steps of real (non-padding) tokens / step seconds.

MFU = tokens/s × ``flops_per_token(config, mean tokens per sequence)`` / peak, the one formula of
benchmarks/gpu.py (6 × the dense layers' weights, 12·L·H·mean length for attention, the MLM head at 15% of
the tokens), against the datasheet's dense bf16 peak and against the bf16 matrix-product rate measured on
the device (the ``device`` part).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# model preset, tokens per example, global (= micro) batch on one H200: activations far under its 141 GB
E2E_CONFIGS = {
    "base-128": ("base", 128, 256),
    "large-128": ("large", 128, 256),
    "base-512": ("base", 512, 64),
    "large-512": ("large", 512, 32),
}
FAST_SETTINGS = {
    "compile": True,
    "model_overrides": {
        "pad_vocab_to_multiple_of": 64,
        "unpad_attention": "varlen",
        "attention_probs_dropout_prob": 0.0,
    },
}  # the all_switches variant of benchmarks/gpu.py
EAGER_SETTINGS = {"compile": False}  # the product's model as it is, not compiled
# Sides that are ours with other settings over FAST_SETTINGS (merged into them), the A/Bs of base-128/ours.
# For the elementwise kernels, which on an H200 (2026-12-04) ran far below the ~4.3 TB/s a copy reaches (the
# fused residual + dropout + LayerNorm at ~1.3 TB/s forward, 1.9 backward, GELU 2.7 / 3.0):
# - tuned: coordinate-descent tuning of the Triton kernels' launch settings (block sizes, warps);
# - aten-rng: the dropout masks drawn by torch's own random kernel (fallback_random) rather than inside the
#   fused kernels, where Triton's Philox runs once per element and keeps one of its four numbers: arithmetic
#   for 24 M elements that, at the H200's integer rate, takes about what those kernels take (the suspect);
# - aligned-rng: align_random_eager (torch 2.13 has it; a torch without it refuses it before the launch): the
#   masks drawn inside the fused kernels as eager's dropout kernel draws them, one Philox call for 4 or 8
#   elements instead of one an element (and equal to eager's); what bertpipe compiles with on a torch whose
#   Inductor has the 4x random path (bert.pretrain.config.inductor_options, pytorch/pytorch#198333);
# - no-dropout: hidden dropout 0 too (the model of cramming and ModernBERT's pretraining: a different model,
#   so never a default; it says what the dropout costs);
# - autotune: max_autotune_gemm, Inductor's Triton matrix-product templates, which can take the bias, GELU
#   and GELU's derivative into the product (GELU took 4.0 ms of call c's 16.7 ms of elementwise kernels); its
#   compilation benchmarks many kernels and may outrun the budget's estimate (not measured): run it after the part
#   `layer` has shown it pays, last in a call.
# For the host, whose ~50 ms a BERT-base step (profiler on) is about as slow as the GPU's 47 ms of kernels:
# - cpp-wrapper: the compiled graphs' kernel launches from generated C++ rather than Python;
# - cudagraphs: Inductor's CUDA graphs (one launch a graph), with the packed sizes rounded up to a multiple of
#   1024 tokens (pack_multiple_of) so the batches share a few shapes, a graph each (~1.6% more tokens).
VARIANTS = {
    "aten-rng": {"compile_options": {"fallback_random": True}},
    "aligned-rng": {"compile_options": {"align_random_eager": True}},
    "cpp-wrapper": {"compile_options": {"cpp_wrapper": True}},
    "tuned": {"compile_options": {"coordinate_descent_tuning": True}},
    "cudagraphs": {"compile_options": {"triton.cudagraphs": True}, "pack_multiple_of": 1024},
    "no-dropout": {"model_overrides": {"hidden_dropout_prob": 0.0}},
    "autotune": {"compile_options": {"max_autotune_gemm": True}},
}


# The variants that keep the model (every one but no-dropout): what --adopt may carry to the other configs.
ADOPTABLE = tuple(side for side, settings in VARIANTS.items() if "model_overrides" not in settings)
ADOPT_MIN_GAIN = 1.02  # a variant is adopted only this much faster than ours: a margin over run-to-run noise


def best_variant(parts: dict) -> tuple[str, float] | None:
    """The measured ``base-128/<variant>`` (of ``ADOPTABLE``) fastest against ``base-128/ours``, and its gain,
    when that is at least ``ADOPT_MIN_GAIN``; else None."""
    ours = (parts.get("base-128/ours") or {}).get("tokens_per_s")
    if not ours:
        return None
    gains = {side: (parts.get(f"base-128/{side}") or {}).get("tokens_per_s", 0) / ours for side in ADOPTABLE}
    side = max(gains, key=gains.get)
    return (side, round(gains[side], 4)) if gains[side] >= ADOPT_MIN_GAIN else None


def variant_settings(side: str) -> dict:
    """FAST_SETTINGS with ``VARIANTS[side]`` merged in (model_overrides key by key), a fresh copy."""
    settings = json.loads(json.dumps(FAST_SETTINGS))
    for key, value in VARIANTS.get(side, {}).items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


# The sides that are ours run another way: the budget scales them from ours' measured cost.
OURS_VARIANTS = ("eager", "profile", "bf16-accumulation", *VARIANTS)
ZERO1_BF16 = REPO / "deepspeed_configs" / "zero1_bf16.json"  # the shipped JSON: fp32 gradient accumulation


def bf16_accumulation_config(work: Path) -> Path:
    """The shipped ZeRO-1 bf16 JSON without its ``data_types``: DeepSpeed's default bf16 gradient accumulation
    (its ZeRO optimizer instead of BF16_Optimizer), the A/B side ``bf16-accumulation``."""
    values = json.loads(ZERO1_BF16.read_text())
    values.pop("data_types", None)
    path = work / "configs" / "zero1_bf16_bf16_accumulation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))
    return path


# flash varlen attention needs CUDA; the CPU dry run keeps the rest and takes the CPU's (reference) path
CPU_SUBSTITUTIONS = {"unpad_attention": "padded"}
PEAK_HOOK_ENV = "BERTPIPE_BENCH_PEAK_DIR"
PEAK_HOOK = '''"""benchmarks/gpu_e2e.py: at exit, this process's peak memory as JSON into $BERTPIPE_BENCH_PEAK_DIR."""
import atexit
import json
import os
import sys


def _bertpipe_bench_peak():
    try:
        import resource

        record = {"argv0": sys.argv[0] if sys.argv else "", "pid": os.getpid(),
                  "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            record["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
            record["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
            stats = torch.cuda.memory_stats()  # cudaMalloc/cudaFree calls: the caching allocator's misses
            record["cuda_allocator"] = {k: stats.get(k) for k in ("num_device_alloc", "num_device_free",
                                                                  "num_alloc_retries", "num_sync_all_streams")}
            record["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        path = os.path.join(os.environ["BERTPIPE_BENCH_PEAK_DIR"], "peak-%d.json" % os.getpid())
        with open(path, "w") as f:
            json.dump(record, f)
    except Exception as e:  # a benchmark aid: never let it fail the process
        print("benchmark peak hook: %r" % (e,), file=sys.stderr)


if os.environ.get("BERTPIPE_BENCH_PEAK_DIR"):
    atexit.register(_bertpipe_bench_peak)


def _chain():  # the sitecustomize this one shadows, if any, still runs
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_chain()
'''


# --- processes ------------------------------------------------------------------------------------------


def run_logged(command: list[str], log: Path, timeout_s: float, env: dict | None = None) -> float:
    """Run ``command`` in REPO, output to ``log``; wall seconds. Raises RuntimeError on a non-zero exit and
    TimeoutError past ``timeout_s``, after killing the whole tree (the launcher's ranks run in sessions of
    their own, which a plain kill of the launcher would leave holding the GPU)."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            code = process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            kill_tree(process)
            raise TimeoutError(f"{command[2:4]} cut at {timeout_s:.0f} s (the time budget)") from None
    if code != 0:
        raise RuntimeError(f"{' '.join(command[1:4])} exited {code}: {log.read_text()[-2000:]}")
    return time.perf_counter() - started


def kill_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process under it (found before any is killed, so none is orphaned unseen)."""
    import psutil

    tree = []
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = psutil.Process(process.pid).children(recursive=True)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30  # until each has exited (a zombie has: it holds no memory, no GPU)
    while time.monotonic() < deadline and any(_running(p) for p in tree):
        time.sleep(0.05)


def _running(process) -> bool:
    """Whether a psutil.Process still runs (neither gone nor a zombie waiting to be reaped)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def bertpipe_command(*argv: str) -> list[str]:
    """A `bertpipe` command, as ``python -m flows.cli`` with this interpreter."""
    return [sys.executable, "-m", "flows.cli", *argv]


# --- inputs ---------------------------------------------------------------------------------------------


def group_documents(raw: Path, group: int) -> int:
    """Join every ``group`` consecutive documents of scale.py's plain-text files (a line each, a blank line
    after) into one document, in place; the number of documents left. Its documents are ~200 words, too
    short to fill 512-token examples as encyclopedia articles do."""
    if group < 1:
        raise ValueError(f"a document group of {group}: give at least 1")
    left = 0
    for path in sorted(raw.glob("part-*.txt")):
        docs = [d for d in path.read_bytes().split(b"\n\n") if d.strip()]
        joined = [b"\n".join(docs[i : i + group]) for i in range(0, len(docs), group)]
        path.write_bytes(b"".join(d + b"\n\n" for d in joined))
        left += len(joined)
    return left


def make_corpus(work: Path, megabytes: float, vocab_size: int, workers: int, timeout_s: float) -> dict:
    """A synthetic corpus through ``bertpipe shard`` and ``vocab``: {"corpus", "vocab", seconds per stage}."""
    raw, corpus, vocab = work / "generated" / "raw", work / "corpus", work / "vocab"
    logs = work / "logs"
    out: dict = {"megabytes_asked": megabytes, "seconds": {}}
    deadline = time.monotonic() + timeout_s
    if not (corpus / "manifest.json").exists():
        shutil.rmtree(work / "generated", ignore_errors=True)
        out["seconds"]["generate"] = round(
            run_logged([sys.executable, str(REPO / "benchmarks/scale.py"), "--generate-only", "--gb",
                        str(megabytes / 1000), "--format", "txt", "--out", str(work / "generated")],
                       logs / "generate.log", deadline - time.monotonic()), 1)  # fmt: skip
        out["documents"] = group_documents(raw, 8)
        out["seconds"]["shard"] = round(
            run_logged(bertpipe_command("shard", "--input", str(raw), "--out", str(corpus), "--num-shards",
                                        str(max(1, workers)), "--workers", str(workers)),
                       logs / "shard.log", deadline - time.monotonic()), 1)  # fmt: skip
    if not (vocab / "manifest.json").exists():
        out["seconds"]["vocab"] = round(
            run_logged(bertpipe_command("vocab", "--corpus", str(corpus), "--out", str(vocab), "--vocab-size",
                                        str(vocab_size)), logs / "vocab.log", deadline - time.monotonic()), 1)  # fmt: skip
    out.update(corpus=str(corpus), vocab=str(vocab))
    return out


def make_examples(corpus: Path, vocab: Path, out: Path, seq_len: int, workers: int, timeout_s: float) -> dict:
    """``bertpipe examples`` at ``seq_len`` tokens (static masking, the stage's defaults) into ``out``."""
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        seconds = run_logged(bertpipe_command("examples", "--corpus", str(corpus), "--vocab", str(vocab), "--out",
                                              str(out), "--max-seq-length", str(seq_len), "--workers", str(workers)),
                             out.parent / "logs" / f"examples-{seq_len}.log", timeout_s)  # fmt: skip
    else:
        seconds = 0.0
    stats = json.loads((out / "manifest.json").read_text()).get("stats", {})
    examples, tokens = stats.get("examples"), stats.get("tokens")
    return {"dir": str(out), "seconds": round(seconds, 1), "examples": examples, "tokens": tokens,
            "mean_tokens": round(tokens / examples, 1) if examples and tokens else None}  # fmt: skip


# --- measurement ----------------------------------------------------------------------------------------


def steady_figures(step_s: list[float], tokens: list[int], samples: list[int], warmup: int) -> dict:
    """Median step time, median tokens/s and mean tokens per sequence over the steps past ``warmup``."""
    if len(step_s) <= warmup:
        raise ValueError(f"{len(step_s)} steps recorded, none past the {warmup} warmup steps: run more steps")
    times, toks, seqs = step_s[warmup:], tokens[warmup:], samples[warmup:]
    return {
        "timed_steps": len(times),
        "median_step_s": round(statistics.median(times), 4),
        "tokens_per_s": round(statistics.median(t / s for t, s in zip(toks, times, strict=True))),
        "mean_tokens_per_sequence": round(sum(toks) / sum(seqs), 1),
        "tokens_per_step": round(statistics.mean(toks)),
    }


def mfu_figures(
    tokens_per_s: float, flops_per_token: float, datasheet: float | None, measured: float | None
) -> dict:
    """Model FLOP/s and MFU against the datasheet peak and against the measured matrix-product rate."""
    rate = tokens_per_s * flops_per_token
    return {
        "model_tflops_per_s": round(rate / 1e12, 3),
        "mfu": round(rate / datasheet, 4) if datasheet else None,
        "mfu_of_measured_bf16_rate": round(rate / measured, 4) if measured else None,
    }


def read_metrics(run: Path, warmup: int) -> dict:
    """Step figures and data wait from a run's metrics.jsonl (every step a record: ``log_every`` 1)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if "tokens_per_s" in r]
    figures = steady_figures([r["step_time_s"] for r in train], [r["tokens"] for r in train],
                             [r["samples"] for r in train], warmup)  # fmt: skip
    steady = train[warmup:]
    wait = sum(r["data_wait_s"] for r in steady)
    figures.update(
        data_wait_share=round(wait / sum(r["step_time_s"] for r in steady), 4),
        data_wait_share_max_step=round(max(r["data_wait_share"] for r in steady), 4),
        loss_first_last=[round(train[0]["loss"], 3), round(train[-1]["loss"], 3)],
        step_times_s=[round(r["step_time_s"], 4) for r in train],
    )
    return figures


def read_peak(peak_dir: Path) -> dict:
    """The rank's peak memory as the PEAK_HOOK wrote it (the process running bert/pretrain/__main__.py)."""
    rank = os.path.join("bert", "pretrain", "__main__.py")
    for path in sorted(peak_dir.glob("peak-*.json")):
        record = json.loads(path.read_text())
        if record.get("argv0", "").endswith(rank):
            return peak_record(record)
    return {"peak_memory": f"not recorded: no {rank} process wrote to {peak_dir}"}


def peak_record(record: dict) -> dict:
    """GiB figures of a PEAK_HOOK record (CUDA ones only where the process used CUDA)."""
    out = {"peak_host_rss_gib": round(record["max_rss_kib"] / 2**20, 2)}
    if "cuda_max_allocated_bytes" in record:
        out["peak_memory_gib"] = round(record["cuda_max_allocated_bytes"] / 2**30, 2)
        out["peak_reserved_gib"] = round(record["cuda_max_reserved_bytes"] / 2**30, 2)
    for key in ("cuda_allocator", "cuda_alloc_conf"):
        if key in record:
            out[key] = record[key]
    return out


def write_peak_hook(directory: Path) -> Path:
    """The PEAK_HOOK as ``directory/sitecustomize.py``; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(PEAK_HOOK)
    return directory


def run_ours(
    name: str,
    examples: Path,
    model: str,
    batch: int,
    steps: int,
    warmup: int,
    settings: dict,
    work: Path,
    timeout_s: float,
    deepspeed_config: Path = ZERO1_BF16,
) -> dict:
    """`bertpipe pretrain` through the launcher with ``settings`` (a TrainConfig JSON) and ``deepspeed_config``:
    its step figures, data wait and the rank's peak memory; the run's checkpoints are deleted after (a large
    one is ~5 GB)."""
    from bert.model import BertConfig

    run, logs = work / "runs" / name, work / "logs"
    shutil.rmtree(run, ignore_errors=True)
    peak_dir = work / "peaks" / name
    shutil.rmtree(peak_dir, ignore_errors=True)
    peak_dir.mkdir(parents=True)
    hook = write_peak_hook(work / "hook")
    env = {**os.environ, PEAK_HOOK_ENV: str(peak_dir)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    from bert.pretrain.config import cuda_graphs

    graphs = cuda_graphs(settings.get("compile_options") or {})
    if graphs:  # Inductor says what it records, and why it skips a graph, only under this
        env.setdefault("TORCH_LOGS", "cudagraphs")
    config_file = work / "configs" / f"{name}.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(settings))
    command = bertpipe_command(
        "pretrain", "--config", str(config_file), "--examples", str(examples), "--model-config", model,
        "--num-gpus", "1", "--deepspeed-config", str(deepspeed_config),
        "--global-batch-size", str(batch), "--micro-batch-size", str(batch), "--lr", "1e-4",
        "--warmup-steps", "10", "--schedule-steps", "1000", "--no-progress", "--out", str(run),
        "--max-steps", str(steps),
    )  # fmt: skip
    wall = run_logged(command, logs / f"{name}.log", timeout_s, env)
    result = json.loads((run / "result.json").read_text())
    cfg = BertConfig.from_json_file(run / "hf")
    figures = read_metrics(run, warmup)
    shutil.copyfile(run / "metrics.jsonl", logs / f"{name}.metrics.jsonl")
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return {
        "side": "bertpipe pretrain (launcher, DeepSpeed ZeRO-1 bf16, 1 rank)",
        "deepspeed_config": deepspeed_config.name,
        "settings": settings,
        "device": result.get("device"),
        "steps": result["step"],
        "warmup_steps_excluded": warmup,
        "global_batch": batch,
        "micro_batch": batch,
        "wall_s": round(wall, 1),
        **figures,
        **read_peak(peak_dir),
        **({"cuda_graphs": cuda_graph_lines(logs / f"{name}.log")} if graphs else {}),
        "_config": cfg.to_dict(),
    }


def cuda_graph_lines(log: Path) -> dict:
    """What a run's log (under TORCH_LOGS=cudagraphs) says of its CUDA graphs: trees recorded (one per shape),
    re-recordings, and Inductor's reasons for a graph it ran without them (the first few)."""
    lines = log.read_text(errors="replace").splitlines()
    skips = [line.strip()[:400] for line in lines if "skipping cudagraphs" in line]
    return {
        "trees_recorded": sum("Recording cudagraph tree" in line for line in lines),
        "re_recorded": sum("Re-recording function" in line for line in lines),
        "skipped": len(skips),
        "skip_reasons": skips[:5],
        "bertpipe_warning": next(
            (line.strip()[:400] for line in lines if "asked for CUDA graphs" in line), None
        ),
    }


def run_transformers(
    name: str,
    examples: Path,
    model: str,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    work: Path,
    timeout_s: float,
) -> dict:
    """``transformers_main`` in its own process (its memory and any failure stay there); its JSON."""
    out = work / "runs" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "transformers", "--examples", str(examples),
               "--model", model, "--batch-size", str(batch), "--steps", str(steps), "--warmup", str(warmup),
               "--device", device, "--out", str(out)]  # fmt: skip
    wall = run_logged(command, work / "logs" / f"{name}.log", timeout_s)
    report = json.loads(out.read_text())
    report["wall_s"] = round(wall, 1)
    return report


def transformers_main(argv: list[str] | None = None) -> dict:
    """transformers.BertForPreTraining (SDPA) + fused AdamW + bf16 autocast over bertpipe's batches; JSON out."""
    import tempfile

    import torch
    import transformers

    from bert.pretrain.config import TrainConfig
    from bert.pretrain.data import RankBatches
    from bert.pretrain.run import load_run_inputs

    p = argparse.ArgumentParser(prog="gpu_e2e.py transformers")
    p.add_argument("--examples", type=Path, required=True)
    p.add_argument("--model", default="base")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, required=True, help="all steps, warmup included")
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="gpu-e2e-") as scratch:
        config = TrainConfig(examples=str(args.examples), out=scratch, model_config=args.model,
                             global_batch_size=args.batch_size, micro_batch_size=args.batch_size,
                             max_steps=args.steps)  # fmt: skip
        run = load_run_inputs(config, 0, 1)  # the examples, collator and model config bertpipe pretrain uses
    batches = RankBatches(run.train, config.seed, 0, 1, args.batch_size, 1, config.bucket_batches)
    prepared = []
    for _ in range(args.steps):  # collated ahead: the baseline never waits for data
        epoch, micro = batches.next()
        batch = run.collator(run.train, micro[0], epoch)
        prepared.append({k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch)
    hf_config = transformers.BertConfig(**run.model_config.to_dict(), attn_implementation="sdpa")
    torch.manual_seed(config.seed)
    with device:
        model = transformers.BertForPreTraining(hf_config).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-6, **fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    step_s, tokens, samples, losses = [], [], [], []
    previous = None  # the last step's loss, on the device
    for host_batch in prepared:
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
        with autocast:
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if previous is not None:  # a read per step, one step late, as bertpipe reads its metrics
            losses.append(previous.item())
        previous = out.loss.detach()
        step_s.append(time.perf_counter() - t0)
        tokens.append(int(host_batch["attention_mask"].sum()))
        samples.append(len(host_batch["input_ids"]))
    losses.append(previous.item())
    report = {
        "side": "transformers.BertForPreTraining (SDPA) + plain loop: fused AdamW, bf16 autocast, clip 1.0",
        "transformers": transformers.__version__,
        "device": str(device),
        "steps": len(step_s),
        "warmup_steps_excluded": args.warmup,
        "global_batch": args.batch_size,
        "padded_tokens_per_step": int(prepared[0]["input_ids"].numel()),
        **steady_figures(step_s, tokens, samples, args.warmup),
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
        "step_times_s": [round(s, 4) for s in step_s],
        "_config": run.model_config.to_dict(),
    }
    if device.type == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    import resource

    report["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    args.out.write_text(json.dumps(report))
    return report


# --- the time budget ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCost:
    """A run's wall time as the budget scales it: start-up and wind-down (checkpoint, export), the extra
    time of the warmup steps (compilation), and the steady steps."""

    fixed_s: float
    compile_s: float
    step_s: float
    steps: int


def run_cost(wall_s: float, step_times: list[float], warmup: int) -> RunCost:
    """Split a measured run's ``wall_s`` by its per-step times (the first ``warmup`` of them compile)."""
    median = statistics.median(step_times[warmup:] or step_times)
    compile_s = max(0.0, sum(step_times[:warmup]) - warmup * median)
    return RunCost(max(0.0, wall_s - sum(step_times)), compile_s, median, len(step_times))


@dataclass(frozen=True)
class Shape:
    """What an e2e config's cost grows with: layers (compilation), weights (start-up, checkpoint, export)
    and the model FLOPs of one step."""

    layers: int
    params: float
    step_flops: float


# A base-128 run on an H200 before any was measured here, per side; deliberately high (not a measurement).
PRIOR_COST = {
    "ours": RunCost(fixed_s=45.0, compile_s=90.0, step_s=0.25, steps=50),
    "eager": RunCost(fixed_s=45.0, compile_s=5.0, step_s=0.35, steps=50),
    "transformers": RunCost(fixed_s=30.0, compile_s=5.0, step_s=0.35, steps=50),
}
PRIOR_S = {"overhead": 60.0, "step": 90.0, "step_compile": 150.0, "pretrain": 180.0, "pretrain_variants": 300.0, "finetune": 180.0,
           "tests": 180.0, "device": 20.0, "layer": 150.0}  # fmt: skip
SAFETY = 1.25


class Budget:
    """Wall seconds left of ``total_s`` and conservative costs of the parts still to run.

    An e2e part ``CONFIG/SIDE`` costs what the measured run of the same side nearest in step FLOPs cost,
    scaled part by part to CONFIG's ``Shape``: start-up by the square root of the weights, compilation by the
    layers, steps by the step FLOPs; before any such run, ``PRIOR_COST`` as base-128's (eager falls back on
    ours). × SAFETY. Other parts: their prior, or what they took.
    """

    def __init__(self, total_s: float, shapes: dict[str, Shape] | None = None, clock=time.monotonic):
        self.total_s = total_s
        self.shapes = shapes or {}
        self.clock = clock
        self.started = clock()
        self.measured: dict[str, float] = {}
        self.costs: dict[str, RunCost] = {}

    def remaining(self) -> float:
        return self.total_s - (self.clock() - self.started)

    def record(self, part: str, seconds: float, result: dict | None = None) -> None:
        """What ``part`` took; an e2e part's ``result`` (its step times) splits it for scaling."""
        self.measured[part] = seconds
        if result and result.get("step_times_s"):
            self.costs[part] = run_cost(
                seconds, result["step_times_s"], result.get("warmup_steps_excluded", 0)
            )

    def estimate(self, part: str) -> float:
        """Conservative seconds for ``part``."""
        if "/" not in part:
            return self.measured.get(part, PRIOR_S.get(part, 120.0)) * SAFETY
        config, side = part.split("/", 1)
        target = self.shapes.get(config)
        sides = (side, "ours") if side in OURS_VARIANTS else (side,)
        measured = [(p.split("/")[0], c) for s in sides for p, c in self.costs.items() if p.endswith("/" + s)]
        measured = [(self.shapes[c], cost) for c, cost in measured if c in self.shapes]
        if target is None or not (measured or "base-128" in self.shapes):
            return sum_cost(PRIOR_COST.get(side, PRIOR_COST["ours"])) * 4 * SAFETY  # nothing to scale by
        if measured:
            ref, cost = min(measured, key=lambda m: abs(math.log(m[0].step_flops / target.step_flops)))
        else:
            ref, cost = self.shapes["base-128"], PRIOR_COST.get(side, PRIOR_COST["ours"])
        return SAFETY * (
            cost.fixed_s * math.sqrt(target.params / ref.params)
            + cost.compile_s * target.layers / ref.layers
            + cost.steps * cost.step_s * target.step_flops / ref.step_flops
        )

    def skip_reason(self, part: str) -> str | None:
        """Why ``part`` must be skipped (None when the budget covers its estimate)."""
        need, left = self.estimate(part), self.remaining()
        if need > left:
            return f"time budget: {left:.0f} s left of {self.total_s:.0f}, this part is estimated at {need:.0f} s"
        return None


def sum_cost(cost: RunCost) -> float:
    """A RunCost's seconds, unscaled."""
    return cost.fixed_s + cost.compile_s + cost.steps * cost.step_s


if __name__ == "__main__":
    if sys.argv[1:2] != ["transformers"]:
        sys.exit(
            "usage: gpu_e2e.py transformers --examples DIR --batch-size N --steps N --warmup N [...] (see gpu.py)"
        )
    transformers_main(sys.argv[2:])
