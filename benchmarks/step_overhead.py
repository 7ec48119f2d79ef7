"""Host work per optimizer step: what DeepSpeed's optimizer wrappers launch around the model; prints JSON.

A GPU step of BERT-base runs ~200 parameter tensors through forward, backward and the optimizer. Whatever the
host does per tensor (a norm, an overflow test, a copy into a bucket, a clip) is a kernel launch, and each
read of a device value (``.item()``, ``bool(tensor)``) makes the host wait for the GPU to drain its queue: the
GPU then idles while the host launches the next kernels. This benchmark counts that work on a model with
BERT-base's parameter list (12 layers, the same 200-odd tensors) but tiny widths, so the time it takes is the
host's, and compares it across DeepSpeed configurations with a plain PyTorch loop (``torch.optim.AdamW``,
fused, and ``clip_grad_norm_``: what ``transformers`` users run), all in the same process:

- ``zero1_bf16``: ``deepspeed_configs/zero1_bf16.json`` as shipped (ZeRO-1, bf16 weights, fp32 gradient
  accumulation: DeepSpeed's ``BF16_Optimizer``, whose step bertpipe replaces with one that reads the device
  once with LAMB and never with fused AdamW, ``bert.pretrain.sync_free``);
- ``zero1_bf16_deepspeed_step``: the same with DeepSpeed's own ``BF16_Optimizer.step`` (the norm read back
  twice, the gradients normed and clipped tensor by tensor);
- ``zero1_bf16_bf16_accumulation``: the same file without its ``data_types`` (DeepSpeed's default, gradients
  accumulated in bf16: ``DeepSpeedZeroOptimizer``, which tests every gradient tensor for overflow each step);
- ``zero0_bf16``: no ZeRO, bf16 (DeepSpeed's unfused 16-bit optimizer: an overflow test per parameter
  tensor, each read back on the host; bertpipe warns on CUDA);
- ``zero0_fp32``: no ZeRO, fp32 (bertpipe's default without a DeepSpeed JSON for fp32);
- ``plain``: the reference loop, bf16 autocast.

Per configuration and per phase (forward, backward, optimizer step: DeepSpeed's ``engine.forward``,
``backward`` and ``step``; the reference's own): the operators that launch work (on CUDA the kernels the
profiler saw launched; on the CPU the outermost aten operators less views and allocations), the syncs (on
CUDA the host's waits for the device; on the CPU the reads of a tensor's value, ``aten::_local_scalar_dense``,
each a wait for the GPU where the tensor is on one), the host's milliseconds in the phase, and the median wall
time of a whole step over ``--steps`` steps. Counts are exact and do not depend on the machine's load; times
do. On the CPU, step times mostly measure the host's work; on a GPU, a step's time is the host's work plus
whatever the syncs expose of the device's. AdamW is fused on both devices (on the CPU too, as bertpipe runs it on CUDA).

    .venv/bin/python benchmarks/step_overhead.py                    # CPU
    python benchmarks/step_overhead.py --device cuda                # GPU (benchmarks/gpu.py part "overhead")
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# BERT-base's layout (12 layers, pooler, MLM and NSP heads) at widths where the kernels cost next to nothing.
NARROW = {"vocab_size": 1024, "hidden_size": 32, "num_hidden_layers": 12, "num_attention_heads": 2,
          "intermediate_size": 64, "max_position_embeddings": 128}  # fmt: skip
BATCH, SEQ_LEN = 4, 32
# aten operators that only make views or allocate: no kernel of their own
NO_KERNEL = {"view", "as_strided", "empty", "empty_strided", "detach", "slice", "select", "reshape", "expand",
             "t", "transpose", "unsqueeze", "alias", "resolve_conj", "resolve_neg", "_reshape_alias", "unbind",
             "split", "squeeze", "permute", "_unsafe_view", "lift_fresh", "narrow", "chunk", "split_with_sizes",
             "empty_like", "set_", "result_type", "flatten", "expand_as", "detach_", "view_as", "is_nonzero",
             "_has_compatible_shallow_copy_type", "item", "_local_scalar_dense", "to", "_to_copy",
             "contiguous"}  # fmt: skip
PHASES = ("forward", "backward", "step")
SYNC_OP = "aten::_local_scalar_dense"  # a read of a tensor's value (.item(), bool(), float())
LAUNCH_EVENTS = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchKernelExC",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # the host waits


def deepspeed_configs() -> dict[str, dict]:
    """name -> DeepSpeed JSON (with "auto" values, filled by bertpipe as in a run)."""
    from bert.pretrain.ds_config import load_deepspeed_config

    configs = {name: load_deepspeed_config(REPO / "deepspeed_configs" / f"{name}.json")
               for name in ("zero1_bf16", "zero0_bf16", "zero0_fp32")}  # fmt: skip
    bf16_accumulation = copy.deepcopy(configs["zero1_bf16"])
    del bf16_accumulation["data_types"]
    return {
        "zero1_bf16": configs["zero1_bf16"],
        "zero1_bf16_deepspeed_step": configs.pop("zero1_bf16"),
        "zero1_bf16_bf16_accumulation": bf16_accumulation,
        **configs,
    }


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, NARROW["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3::7] = ids[:, 3::7]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": labels, "next_sentence_label": torch.tensor([0, 1] * (BATCH // 2))}  # fmt: skip
    return batch


def wrap_phases(obj) -> None:
    """Put each of ``obj``'s methods named in PHASES in a record_function range ``PHASE_<name>``."""
    for name in PHASES:
        method = getattr(obj, name)

        def wrapped(*args, _method=method, _name=name, **kwargs):
            with torch.profiler.record_function("PHASE_" + _name):
                return _method(*args, **kwargs)

        setattr(obj, name, wrapped)


def count_phases(prof, cuda: bool) -> dict:
    """Per phase: launched work (CUDA kernels, or on the CPU outermost non-view aten ops) and device reads."""
    events = prof.events()
    ranges = [(e.name[len("PHASE_") :], e.time_range.start, e.time_range.end)
              for e in events if e.name.startswith("PHASE_") and e.device_type == torch.autograd.DeviceType.CPU]  # fmt: skip
    out = {}
    for phase, start, end in ranges:
        inside = [e for e in events if start <= e.time_range.start <= end]
        syncs = (
            sum(1 for e in inside if e.name in SYNC_EVENTS)
            if cuda
            else sum(1 for e in inside if e.name == SYNC_OP)
        )
        if cuda:  # a kernel's own time range is on the GPU: count the launches inside the phase
            work = sum(1 for e in inside if e.name in LAUNCH_EVENTS)
        else:
            work = sum(
                1
                for e in inside
                if e.name.startswith("aten::")
                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
                and e.name[len("aten::") :] not in NO_KERNEL
            )
        row = out.setdefault(phase, {"launches": 0, "syncs": 0, "host_ms": 0.0})
        row["launches"] += work
        row["syncs"] += syncs
        row["host_ms"] += (end - start) / 1e3
    for row in out.values():
        row["host_ms"] = round(row["host_ms"], 2)
    return out


def measure(step, steps: int, warmup: int, cuda: bool, phases_of) -> dict:
    """Median step time over ``steps`` after ``warmup``, and one profiled step split by the phases of
    ``phases_of`` (the object whose forward, backward and step methods ``step`` calls)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    wrap_phases(phases_of)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    phases = count_phases(prof, cuda)
    return {
        "median_step_ms": round(1e3 * statistics.median(times), 2),
        "phases": phases,
        "launches_per_step": sum(p["launches"] for p in phases.values()),
        "syncs_per_step": sum(p["syncs"] for p in phases.values()),
    }


def run_deepspeed(
    ds_json: dict, device: str, steps: int, warmup: int, optimizer: str = "adamw", sync_free_step: bool = True
) -> dict:
    from bert import BertConfig, BertForPreTraining
    from bert.optim import build_optimizer
    from bert.pretrain import engine as eng
    from bert.pretrain import sync_free
    from bert.pretrain.config import BatchSizes, TrainConfig
    from bert.pretrain.ds_config import fill_deepspeed_config

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**NARROW))
    train = TrainConfig(examples="unused", out="unused", lr=1e-3, max_steps=1000)
    batch_sizes = BatchSizes(
        global_batch_size=BATCH, micro_batch_size=BATCH, gradient_accumulation_steps=1, world_size=1
    )
    filled, precision = fill_deepspeed_config(ds_json, train, batch_sizes, NARROW["hidden_size"])
    base = build_optimizer(model, optimizer, 1e-3, (0.9, 0.999), 1e-6, 0.01, fused=True)  # as on CUDA
    # DeepSpeed prints its op builds and memory use, and logs its warnings, to stdout: JSON only there
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):
        eng.init_distributed()
        engine = eng.Engine(model, base, filled, lambda step: 1e-3, seed=0, compile=False)
    if not sync_free_step:
        sync_free.uninstall(engine.engine.optimizer)
    batch = make_batch()

    def step():
        engine.step([batch])

    result = measure(step, steps, warmup, device == "cuda", engine.engine)
    return {"optimizer": type(engine.engine.optimizer).__name__, "base_optimizer": type(base).__name__,
            "precision": precision, "zero_stage": engine.zero_stage,
            "step": "bertpipe's (sync_free)" if engine.sync_free_step and sync_free_step else "DeepSpeed's",
            **result}  # fmt: skip


def run_plain(device: str, steps: int, warmup: int) -> dict:
    from bert import BertConfig, BertForPreTraining
    from bert.model.encoder import packing_inputs
    from bert.model.heads import find_mlm_positions

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**NARROW)).to(device).train()
    cuda = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = make_batch()
    batch.update(packing_inputs(batch["attention_mask"]), mlm_positions=find_mlm_positions(batch["labels"]))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    model.bert.check_values = False  # as bertpipe's engine: the collator checks on the host
    dtype = torch.bfloat16

    class Loop:
        def forward(self):
            with torch.autocast(device_type=device, dtype=dtype):
                return model(**batch).loss

        def backward(self, loss):
            loss.backward()

        def step(self):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    loop = Loop()

    def step():
        loop.backward(loop.forward())
        loop.step()

    return {"optimizer": "torch.optim.AdamW (fused)", "precision": "bf16 autocast",
            **measure(step, steps, warmup, cuda, loop)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    p.add_argument(
        "--optimizer", default="adamw", choices=("adamw", "lamb"), help="the DeepSpeed runs' optimizer"
    )
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    configs = deepspeed_configs()
    names = args.configs.split(",") if args.configs else [*configs, "plain"]
    unknown = [n for n in names if n not in configs and n != "plain"]
    if unknown:
        p.error(f"unknown configurations {unknown}: choose from {[*configs, 'plain']}")
    from bert import BertConfig, BertForPreTraining

    tensors = len(list(BertForPreTraining(BertConfig(**NARROW)).parameters()))
    report: dict = {"benchmark": "step_overhead", "device": args.device, "torch": torch.__version__,
                    "optimizer": args.optimizer,
                    "model": {**NARROW, "parameter_tensors": tensors, "batch": BATCH, "seq_len": SEQ_LEN},
                    "counted": "CUDA kernel launches and copies" if args.device == "cuda"
                    else "outermost aten operators that are not views or allocations",
                    "results": {}}  # fmt: skip
    for name in names:
        if name == "plain":
            report["results"][name] = run_plain(args.device, args.steps, args.warmup)
        else:
            report["results"][name] = run_deepspeed(
                configs[name],
                args.device,
                args.steps,
                args.warmup,
                args.optimizer,
                sync_free_step=name != "zero1_bf16_deepspeed_step",
            )
    reference = report["results"].get("plain")
    for result in report["results"].values():
        if reference:
            result["launches_vs_plain"] = round(
                result["launches_per_step"] / reference["launches_per_step"], 2
            )
            result["step_time_vs_plain"] = round(result["median_step_ms"] / reference["median_step_ms"], 2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
