"""One BERT encoder layer's kernels under each Inductor setting: forward + backward time and the kernels; JSON.

The end-to-end A/Bs of ``benchmarks/gpu.py`` (``gpu_e2e.VARIANTS``) cost ~85 s of device time each: a whole
``bertpipe pretrain`` and its 29 s compilation. The kernels they would change are those of the encoder
layer, which this compiles alone (``torch.compile`` of one ``BertLayer`` as DeepSpeed's bf16 runs it: bf16
weights and activations, packed tokens, varlen flash attention on CUDA, attention dropout 0) and times on N
packed tokens (default 31,744 = 248 sequences of 128: BERT-base's batch of 256 × 128 at 124 real tokens a
sequence), in seconds per setting:

- ``default``: the product's compiled layer (hidden dropout 0.1), with the options bertpipe adds
  (``bert.pretrain.config.inductor_options``: on a torch whose Inductor has the 4x random path,
  ``align_random_eager``);
- ``aten-rng``: ``fallback_random`` (dropout masks from torch's random kernel, not drawn inside the fused
  kernels: on an H200 the fused residual + dropout + LayerNorm kernels moved ~1.3 TB/s forward, ~1.9
  backward, where a copy reaches ~4.3);
- ``aligned-rng``: ``align_random_eager`` (the masks drawn inside the fused kernels as eager's dropout kernel
  draws them: one Philox call for several elements instead of one an element; torch 2.13 has it);
- ``tuned``: ``coordinate_descent_tuning`` (Inductor searches the Triton kernels' launch settings);
- ``no-dropout``: hidden dropout 0 (a different model: what the dropout costs);
- ``autotune``: ``max_autotune_gemm`` (Triton matrix-product templates, which can fuse bias and GELU into
  the product; its compilation benchmarks many kernels, so it runs last);
- ``eager``: the layer not compiled (the reference).

Per setting: the median milliseconds of forward + backward over ``--iters`` (CUDA events; on the CPU the
wall time), the ratio to ``default``, the compilation's seconds, and one profiled iteration summarised as a
run's ``--profile-steps`` are (``bert.pretrain.profile.summarise``): milliseconds by kind and the top kernels
(CUDA; operators on the CPU). A BERT-base step runs 12 such layers, so 12× a
setting's gain per layer is roughly its gain per step. The settings that do not fit in ``--budget-s`` are
skipped, with the reason.

    python benchmarks/layer_kernels.py --device cuda                     # benchmarks/gpu.py part "layer"
    .venv/bin/python benchmarks/layer_kernels.py --tokens 512 --hidden 64 --variants default,eager  # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_e2e  # noqa: E402

# setting -> (Inductor options, BertConfig fields over the layer's); "eager" is not compiled. The named ones are
# the e2e variants' own settings (gpu_e2e.VARIANTS), autotune last (it benchmarks kernels as it compiles).
VARIANTS = {
    "default": ({}, {}),
    **{
        name: (
            gpu_e2e.VARIANTS[name].get("compile_options", {}),
            gpu_e2e.VARIANTS[name].get("model_overrides", {}),
        )
        for name in ("aten-rng", "aligned-rng", "tuned", "no-dropout")
    },
    "eager": (None, {}),
    "autotune": (gpu_e2e.VARIANTS["autotune"]["compile_options"], {}),
}


def make_layer(device: str, hidden: int, heads: int, overrides: dict):
    """A BertLayer in bf16 (what DeepSpeed's bf16 runs train), with the packed inputs of its forward."""
    from bert.model import BertConfig
    from bert.model.encoder import BertLayer

    config = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                        attention_probs_dropout_prob=0.0,
                        unpad_attention="varlen" if device == "cuda" else "padded", **overrides)  # fmt: skip
    torch.manual_seed(0)
    return BertLayer(config).to(device=device, dtype=torch.bfloat16).train()


def packing(device: str, tokens: int, seq_len: int):
    """``tokens`` packed tokens as full sequences of ``seq_len`` (the last one shorter)."""
    from bert.model.encoder import Packing, packing_inputs

    batch = -(-tokens // seq_len)
    mask = torch.arange(batch * seq_len).view(batch, seq_len) < tokens
    host = packing_inputs(mask)
    return Packing(host["unpad_indices"].to(device), batch, seq_len, None, host["cu_seqlens"].to(device),
                   host["max_seqlen"])  # fmt: skip


def timed(step, device: str, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``step`` (CUDA events on a GPU)."""
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def profiled(step, device: str, top: int) -> dict:
    """One profiled call of ``step``, summarised as a training run's profile is (``bert.pretrain.profile``):
    its kernels' (CUDA) or operators' (CPU) time by kind and the ``top`` of them."""
    from torch.profiler import ProfilerActivity, profile

    from bert.pretrain.profile import summarise

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    summary = summarise(prof.key_averages(), 1, time.perf_counter() - started, device, top)
    return {"ms_by_kind": summary["ms_per_step_by_kind"], "top": summary["top"]}


def run_variant(name: str, args) -> dict:
    options, overrides = VARIANTS[name]
    torch._dynamo.reset()
    layer = make_layer(args.device, args.hidden, args.heads, overrides)
    pack = packing(args.device, args.tokens, args.seq_len)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    forward = layer
    if options is not None:
        from bert.pretrain.config import inductor_options

        options, _ = inductor_options(
            options, bool(layer.output.dropout.p), args.device
        )  # as the engine does
        compile_kwargs = {"options": options} if options else {}
        forward = torch.compile(layer, backend=args.backend, dynamic=False, **compile_kwargs)

    def step():
        forward(x, None, pack).backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    started = time.perf_counter()
    step()  # compiles
    if args.device == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    timed(step, args.device, args.warmup)
    times = timed(step, args.device, args.iters)
    return {
        "inductor_options": options,
        "model_overrides": overrides,
        "compile_s": round(compile_s, 1),
        "median_ms": round(statistics.median(times), 4),
        "min_ms": round(min(times), 4),
        **profiled(step, args.device, args.top),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tokens", type=int, default=31_744, help="packed tokens (N)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="kernels listed per setting")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a CPU check)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip settings once this much time is spent")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here, after each setting")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown settings {unknown}: choose from {list(VARIANTS)}")
    report: dict = {"benchmark": "layer_kernels", "device": args.device, "torch": torch.__version__,
                    "layer": {"tokens": args.tokens, "seq_len": args.seq_len, "hidden": args.hidden,
                              "heads": args.heads, "intermediate": 4 * args.hidden, "dtype": "bf16"},
                    "backend": args.backend, "timed": "forward + backward, median of --iters",
                    "results": {}}  # fmt: skip
    started = time.perf_counter()
    spent: list[float] = []
    for name in names:
        elapsed = time.perf_counter() - started
        need = 2 * max(spent) if spent else 0.0  # autotune's compilation takes longer: it runs last
        if elapsed + need > args.budget_s:
            report["results"][name] = {
                "skipped": f"{elapsed:.0f} s of {args.budget_s:.0f} spent, ~{need:.0f} s needed"
            }
            continue
        before = time.perf_counter()
        try:
            report["results"][name] = run_variant(name, args)
        except Exception as e:  # one setting failing leaves the others measured
            report["results"][name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        spent.append(time.perf_counter() - before)
        report["results"][name]["wall_s"] = round(spent[-1], 1)
        finish(report, started, args.out)  # a run cut short keeps what it measured
    return report


def finish(report: dict, started: float, out: Path | None) -> None:
    """Each result's ratio to ``default``, the wall time so far; the JSON written to ``out`` (atomically)."""
    default = report["results"].get("default", {}).get("median_ms")
    for result in report["results"].values():
        if default and result.get("median_ms"):
            result["vs_default"] = round(result["median_ms"] / default, 4)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=2))
        partial.replace(out)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
