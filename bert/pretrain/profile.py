"""Where a pretraining step's time goes: torch.profiler over a window of steps (``--profile-steps A:B``).

Each rank writes ``OUT/profile/rank<R>/trace.json`` (a Chrome trace: chrome://tracing or ui.perfetto.dev),
``table.txt`` (the profiler's operator table) and ``summary.json``: the window's wall time per step, the
device's busy share (its kernels' time over the wall time: far below 1, the GPU waits on the host) and the
kernel time by kind (matrix products, attention, optimizer, communication, the rest), with the top operators.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from data_prep.manifest import write_json_atomic

log = logging.getLogger("bert.pretrain")

# Lower-case substrings of kernel and operator names, first match wins.
KINDS = (
    (
        "communication",
        ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "gloo"),
    ),
    ("attention", ("flash", "attention", "attn", "fmha", "sdpa")),
    ("optimizer", ("adam", "lamb", "multi_tensor", "foreach", "optimizer")),
    (
        "matmul",
        # nvjet: cuBLAS's Hopper kernels, whose names say neither gemm nor cutlass
        ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "cutlass", "xmma", "wgmma", "linear")
        + ("nvjet", "splitkreduce"),
    ),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def summarise(events, steps: int, wall_s: float, device: str, top: int = 60) -> dict:
    """The summary of a profiler's ``key_averages()``: per-step wall time, busy share, time by kind.

    On CUDA only the device's own events (kernels, copies) are counted: an operator's self device time is
    the time of the kernels it launched, which are rows of their own too (as the profiler's table totals them).
    """
    cuda = device == "cuda"
    rows = []
    for e in events:
        if cuda and (
            e.device_type == torch.autograd.DeviceType.CPU or getattr(e, "is_user_annotation", False)
        ):
            continue
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:  # torch < 2.4
            device_us = getattr(e, "self_cuda_time_total", 0.0)
        rows.append({"name": e.key, "calls": e.count, "self_device_ms": device_us / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3})  # fmt: skip
    key = "self_device_ms" if cuda else "self_cpu_ms"
    rows.sort(key=lambda r: r[key], reverse=True)
    by_kind: dict[str, float] = {}
    for r in rows:
        kind = kind_of(r["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + r[key]
    busy_ms = sum(by_kind.values())
    per_step = 1e3 * wall_s / steps
    return {
        "steps": steps,
        "device": device,
        "wall_ms_per_step": round(per_step, 3),
        "time_measured": "kernel time on the GPU" if cuda else "operators' own CPU time",
        "busy_share": round(busy_ms / steps / per_step, 4) if per_step else None,
        "ms_per_step_by_kind": {
            k: round(v / steps, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top": [
            {
                **r,
                "self_device_ms": round(r["self_device_ms"] / steps, 4),
                "self_cpu_ms": round(r["self_cpu_ms"] / steps, 4),
                "calls_per_step": round(r["calls"] / steps, 2),
            }
            for r in rows[:top]
        ],
        "note": "ms are per step, calls over all the steps profiled (calls_per_step: per step); busy_share = the "
        "time measured over the wall time (below 1: the device idles)",
    }


class StepProfiler:
    """Profiles steps ``start``..``stop`` of a run: call ``before(step)`` and ``after(step)`` around each step,
    with ``step`` the number the step will have (``engine.global_step + 1``), then ``close()``."""

    def __init__(self, window: tuple[int, int] | None, out: Path, rank: int, engine):
        self.window, self.rank, self.engine = window, rank, engine
        self.dir = Path(out) / "profile" / f"rank{rank}"
        self.profiler = None
        self.started = 0.0
        self.summary: dict | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, step: int) -> None:
        if self.window is None or step != self.window[0] or self.profiler is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def after(self, step: int) -> None:
        if self.profiler is None or step < self.window[1]:
            return
        self._finish(step - self.window[0] + 1)

    def close(self, step: int) -> None:
        """At the end of the run: a window the run stopped inside is written for the steps it had."""
        if self.profiler is not None:
            self._finish(step - self.window[0] + 1)

    def _finish(self, steps: int) -> None:
        self._sync()
        wall_s = time.perf_counter() - self.started
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.dir / "trace.json"))
        events = profiler.key_averages()
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.dir / "table.txt").write_text(events.table(sort_by=sort_by, row_limit=40) + "\n")
        self.summary = summarise(events, steps, wall_s, self.device.type)
        write_json_atomic(self.dir / "summary.json", self.summary)
        log.info("profiled %d steps: %.1f ms a step, device busy %.0f%%; %s", steps,
                 self.summary["wall_ms_per_step"], 100 * (self.summary["busy_share"] or 0), self.dir)  # fmt: skip
