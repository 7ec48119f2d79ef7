"""DeepSpeed JSON handling without importing DeepSpeed: load, fill the "auto" values, check agreement.

The DeepSpeed JSON says "auto" for whatever the training config owns (batch sizes, clipping, precision when the
config names one, optimizer/scheduler params); ``fill_deepspeed_config`` fills those and refuses, listing every
one, values that disagree with the training config. ZeRO stage "auto" (the default without a JSON) is 1 with
fp32 gradient accumulation for bf16 (DeepSpeed's BF16_Optimizer), else 0. The parent side (``bertpipe
pretrain``, the flow) checks a run with it before any rank starts; the engine builds DeepSpeed from its result.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

from bert.pretrain.config import BatchSizes, TrainConfig

AUTO = "auto"
# Without a JSON: ZeRO stage "auto" (see ``fill_deepspeed_config``), precision as the training config says.
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": AUTO}, "bf16": {"enabled": AUTO}}
OPTIMIZER_TYPES = {"adamw": ("adamw", "adam"), "lamb": ("lamb",)}


# --- the DeepSpeed config -------------------------------------------------------------------------------


def load_deepspeed_config(path: str | os.PathLike | None) -> dict:
    """The DeepSpeed JSON at ``path`` (when None, ``DEFAULT_DEEPSPEED_CONFIG``: ZeRO stage "auto")."""
    if path is None:
        return copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG)
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    except OSError as e:  # a directory, no permission
        raise ValueError(f"cannot read the DeepSpeed config {path}: {e.strerror or e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object of settings")
    for name in ("bf16", "fp16", "zero_optimization", "optimizer", "scheduler"):
        if name in values and not isinstance(values[name], dict):
            raise ValueError(f'DeepSpeed config {path}: "{name}" must be a JSON object, got {values[name]!r}')
    return values


def resolve_precision(ds_config: dict, precision: str) -> str:
    """fp32/bf16/fp16: the training config's choice, or (``auto``) what the DeepSpeed JSON enables."""
    if precision != "auto":
        return precision
    for name in ("bf16", "fp16"):
        if (ds_config.get(name) or {}).get("enabled") is True:
            return name
    return "fp32"


def fill_deepspeed_config(
    ds_config: dict, config: TrainConfig, batch: BatchSizes, hidden_size: int
) -> tuple[dict, str]:
    """(the DeepSpeed config with every "auto" filled, precision); ValueError listing every disagreement."""
    ds = copy.deepcopy(ds_config)
    problems: list[str] = []
    precision = resolve_precision(ds, config.precision)

    def settle(section: dict, key: str, wanted, where: str, same=lambda a, b: a == b) -> None:
        value = section.get(key, AUTO)
        if value == AUTO:
            section[key] = wanted
        elif not same(value, wanted):
            problems.append(
                f"{where} is {value!r} in the DeepSpeed config, {wanted!r} in the training config"
            )

    close = lambda a, b: abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))  # noqa: E731
    settle(ds, "train_batch_size", batch.global_batch_size, "train_batch_size (global batch)")
    settle(ds, "train_micro_batch_size_per_gpu", batch.micro_batch_size, "train_micro_batch_size_per_gpu")
    settle(
        ds, "gradient_accumulation_steps", batch.gradient_accumulation_steps, "gradient_accumulation_steps"
    )
    settle(ds, "gradient_clipping", config.max_grad_norm, "gradient_clipping (max_grad_norm)", close)
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        settle(section, "enabled", precision == name, f"{name}.enabled (precision {precision})")

    optimizer = ds.pop("optimizer", None)
    if optimizer is not None:
        kind = str(optimizer.get("type", AUTO)).lower()
        if kind != AUTO and kind not in OPTIMIZER_TYPES[config.optimizer]:
            problems.append(
                f"optimizer.type is {optimizer['type']!r}, the training config's optimizer is {config.optimizer!r}"
            )
        params = optimizer.get("params") or {}
        settle(params, "lr", config.lr, "optimizer.params.lr", close)
        settle(params, "betas", list(config.betas), "optimizer.params.betas", lambda a, b: list(a) == list(b))
        settle(params, "eps", config.eps, "optimizer.params.eps", close)
        settle(params, "weight_decay", config.weight_decay, "optimizer.params.weight_decay", close)
    scheduler = ds.pop("scheduler", None)
    if scheduler is not None:
        params = scheduler.get("params") or {}
        settle(params, "warmup_num_steps", config.warmup_steps, "scheduler.params.warmup_num_steps")
        settle(params, "warmup_max_lr", config.lr, "scheduler.params.warmup_max_lr", close)
        if config.total_schedule_steps is not None:
            settle(params, "total_num_steps", config.total_schedule_steps, "scheduler.params.total_num_steps")

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage") == AUTO:
        # bf16: ZeRO-1 with fp32 gradient accumulation, DeepSpeed's BF16_Optimizer. ZeRO-0 bf16 would run its
        # unfused 16-bit optimizer, which reads the device once per parameter tensor every step (a sync each:
        # 206 for BERT-base), and bf16 accumulation its ZeRO optimizer, which tests each gradient for overflow.
        zero["stage"] = 1 if precision == "bf16" else 0
        if precision == "bf16":
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == AUTO:
            zero[key] = value
    ds.setdefault("steps_per_print", 1 << 30)  # bertpipe logs its own metrics
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer, on unless configured, waits for the device at the start of every forward
    # and at every optimizer step (two syncs a step: the host cannot queue the next step while the GPU works;
    # 26% of an H200's time idle for BERT-base, measured 2026-12-04). bertpipe times its own steps.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    ds["zero_allow_untested_optimizer"] = True  # LAMB is bertpipe's, so DeepSpeed has not "tested" it
    leftover = [path for path in _auto_paths(ds)]
    if leftover:
        problems.append(f'bertpipe has no value for "auto" at {", ".join(leftover)}: set them in the JSON')
    if problems:
        raise ValueError(
            "the DeepSpeed config disagrees with the training config:\n  - " + "\n  - ".join(problems)
        )
    return ds, precision


def _auto_paths(obj, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if obj == AUTO else []


SHM_BUFFERS = Path("/dev/shm")


def remove_shm_buffers(port: int | str, rank: int | str = "*") -> None:
    """Unlink the CPU all-reduce buffers DeepSpeed's shm op leaves in /dev/shm (66 MB a rank, never freed).

    They are named deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>; a process that
    still maps one keeps it until it exits. The launcher calls this for every rank once they are gone.
    """
    for path in SHM_BUFFERS.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        with contextlib.suppress(OSError):
            path.unlink()


def _mapped_paths(names: set[str]) -> set[str]:
    """Which of ``names`` (absolute paths) some process of this user maps or holds open.

    A rank creates its buffer with shm_open (an open descriptor) and then mmaps it, so both are looked at;
    /proc/<pid>/maps and fd of other users' processes are unreadable, which is why only this uid's buffers
    are ever candidates.
    """
    held: set[str] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                slash = line.find("/")
                if slash >= 0 and line[slash:].rstrip("\n") in names:
                    held.add(line[slash:].rstrip("\n"))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target in names:
                        held.add(target)
    return held


def sweep_shm_buffers() -> tuple[int, int]:
    """Unlink this user's all-reduce buffers that no live process maps (left by ranks killed outright).

    The launcher removes its own run's buffers when it ends, but a tree kill (SIGKILL of launcher and ranks)
    leaves 66 MB a rank behind until reboot; the next launch calls this. A buffer that a live process maps or
    holds open belongs to a run still going and is kept. Returns (number removed, bytes freed).
    """
    uid = os.getuid()
    candidates: dict[str, Path] = {}
    for path in SHM_BUFFERS.glob(f"deepspeed_allreduce_buffer_{uid}_*"):
        with contextlib.suppress(OSError):
            if path.stat().st_uid == uid:
                candidates[os.path.realpath(path)] = path
    if not candidates:
        return 0, 0
    held = _mapped_paths(set(candidates))
    removed = freed = 0
    for real, path in candidates.items():
        if real in held:
            continue
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            removed += 1
            freed += size
    return removed, freed
