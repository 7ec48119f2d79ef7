"""Training-step throughput of bert.BertForPreTraining vs transformers.BertForPreTraining (SDPA); prints JSON.

One step = forward + backward + AdamW step on the same batch for both models, same weights, same process:
batch 32, lengths uniform in [32, 128] padded to 128, 15% of non-padding non-special tokens predicted,
NSP labels. Throughput counts non-padding tokens. Steps of the two models are interleaved so machine noise
hits both alike; we quote medians and their ratio.

    .venv/bin/python benchmarks/pretrain_step.py                       # CPU: configs mini and small
    python benchmarks/pretrain_step.py --device cuda --dtype bf16 --config base   # GPU, also reports MFU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bert import BertConfig, BertForPreTraining  # noqa: E402

CLS, SEP, MASK, FIRST_WORD_ID = (
    101,
    102,
    103,
    1000,
)  # bert-base-uncased ids; ids below 1000 are special/unused


def make_batch(cfg: BertConfig, batch_size: int, min_len: int, max_len: int, mask_prob: float, seed: int):
    """A synthetic MLM/NSP batch: [CLS] A [SEP] B [SEP], padded to max_len, 15% of word tokens masked."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=g)
    ids = torch.randint(FIRST_WORD_ID, cfg.vocab_size, (batch_size, max_len), generator=g)
    pos = torch.arange(max_len)[None, :]
    mask = pos < lengths[:, None]
    split = lengths // 2
    ids[:, 0] = CLS
    ids[pos == split[:, None]] = SEP
    ids[pos == (lengths - 1)[:, None]] = SEP
    types = ((pos > split[:, None]) & mask).long()
    ids = ids.masked_fill(~mask, 0)
    is_word = mask & (ids >= FIRST_WORD_ID)
    chosen = is_word & (torch.rand(ids.shape, generator=g) < mask_prob)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = ids.masked_fill(chosen, MASK)
    nsp = torch.randint(0, 2, (batch_size,), generator=g)
    return dict(
        input_ids=ids,
        attention_mask=mask.long(),
        token_type_ids=types,
        labels=labels,
        next_sentence_label=nsp,
    )


def step_flops(cfg: BertConfig, batch: dict) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), counting useful work only.

    6 * (encoder matmul params) * tokens + MLM head at predicted positions + pooler/NSP per sequence
    + attention 12 * L * H * sum(len^2) (QK^T and AV, forward and backward) over the real lengths.
    """
    H, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    lengths = batch["attention_mask"].sum(1).double()
    tokens = lengths.sum().item()
    predicted = (batch["labels"] != -100).sum().item()
    encoder = 6 * L * (4 * H * H + 2 * H * F) * tokens
    mlm = 6 * (H * H + H * V) * predicted
    pooler_nsp = 6 * (H * H + 2 * H) * len(lengths)
    attention = 12 * L * H * (lengths**2).sum().item()
    return encoder + mlm + pooler_nsp + attention


def timed_step(model, opt, batch, device, autocast) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of one optimizer step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    with autocast:
        out = model(**batch)
    out.loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def run_config(name: str, args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(args.seed)
    cfg = BertConfig.preset(
        name,
        vocab_size=args.vocab_size,
        unpad=not args.no_unpad,
        unpad_attention=args.unpad_attention,
        use_sdpa=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    ours = BertForPreTraining(cfg).to(device).train()
    models = {"bertpipe": ours}
    if not args.no_hf:
        import transformers

        hf_cfg = transformers.BertConfig(**cfg.to_dict(), attn_implementation="sdpa")
        theirs = transformers.BertForPreTraining(hf_cfg)
        theirs.load_state_dict(ours.state_dict())
        models["transformers"] = theirs.to(device).train()
    if args.compile:
        models["bertpipe"] = torch.compile(ours, dynamic=True)
    opts = {
        k: torch.optim.AdamW(
            m.parameters(), lr=1e-4, weight_decay=0.01, fused=not args.no_fused_adamw or None
        )
        for k, m in models.items()
    }
    batch = make_batch(cfg, args.batch_size, args.min_len, args.max_len, args.mask_prob, args.seed)
    batch = {k: v.to(device) for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu_times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        for k, model in models.items():  # interleaved: noise on a shared machine hits both alike
            wall, cpu = timed_step(model, opts[k], batch, device, autocast)
            if i >= args.warmup:
                times[k].append(wall)
                cpu_times[k].append(cpu)
    peak: dict[str, dict] = {}
    if device.type == "cuda":  # one more step each, alone, for memory: held state, and the step's own peak
        for k, model in models.items():
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            timed_step(model, opts[k], batch, device, autocast)
            peak[k] = {
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "step_memory_gib": round((torch.cuda.max_memory_allocated() - held) / 2**30, 2),
            }
    result: dict = {
        "config": name,
        "params": ours.num_parameters(),
        "non_padding_tokens_per_step": tokens,
        "padded_tokens_per_step": batch["input_ids"].numel(),
        "predicted_tokens_per_step": int((batch["labels"] != -100).sum()),
    }
    for k, ts in times.items():
        median = statistics.median(ts)
        result[k] = {
            "median_step_s": round(median, 4),
            "min_step_s": round(min(ts), 4),
            "tokens_per_s": round(tokens / median, 1),
            "median_process_cpu_s": round(statistics.median(cpu_times[k]), 4),
            **peak.get(k, {}),
        }
        if device.type == "cuda":
            result[k]["mfu"] = round(step_flops(cfg, batch) / median / args.peak_flops, 4)
    if "transformers" in times:
        result["speedup_vs_transformers"] = round(
            statistics.median(times["transformers"]) / statistics.median(times["bertpipe"]), 2
        )
        # CPU seconds are less sensitive to other processes taking the cores (not to memory contention)
        result["cpu_time_ratio"] = round(
            statistics.median(cpu_times["transformers"]) / statistics.median(cpu_times["bertpipe"]), 2
        )
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="mini,small", help="comma-separated presets (tiny, mini, small, base, large)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 master weights"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--peak-flops", type=float, default=989e12, help="device peak for MFU (H100 SXM bf16 dense)"
    )
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-unpad", action="store_true", help="run the dense layers on padded tokens too")
    p.add_argument("--unpad-attention", default="padded", choices=["padded", "per_sequence"])
    p.add_argument("--compile", action="store_true", help="torch.compile our model (dynamic shapes)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--no-fused-adamw", action="store_true", help="foreach AdamW instead of fused, both models"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "pretrain_step",
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": f"{args.batch_size} x {args.max_len}, lengths uniform [{args.min_len}, {args.max_len}]",
        "optimizer": f"AdamW(lr=1e-4, weight_decay=0.01, fused={not args.no_fused_adamw}), both models",
        "timing": f"{args.warmup} warmup steps, median of {args.steps}, steps interleaved",
        "fast_path": {
            "unpad": not args.no_unpad,
            "unpad_attention": args.unpad_attention,
            "sdpa": True,
            "mlm_projection_only_at_predicted_positions": True,
            "fused_qkv_matmul": True,
            "torch_compile": args.compile,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "results": [run_config(name, args) for name in args.config.split(",")],
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
