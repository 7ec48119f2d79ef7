"""The pretraining config and its pure arithmetic: batch sizes, durations, seeds.

Everything here is plain Python, testable without a process group (``check_compile_options`` reads
Inductor's settings, when there are some to check). ``TrainConfig`` is the one source of
truth for batch sizes, optimizer and schedule; the DeepSpeed JSON may only say "auto" for them or agree.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OPTIMIZERS = ("adamw", "lamb")
DECAYS = ("linear", "polynomial", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_MICRO_BATCH_SIZE = 8


@dataclass(frozen=True)
class BatchSizes:
    """global_batch_size = micro_batch_size × gradient_accumulation_steps × world_size, always."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int

    @property
    def per_rank_batch_size(self) -> int:
        """Samples one rank consumes per optimizer step."""
        return self.micro_batch_size * self.gradient_accumulation_steps


def resolve_batch_sizes(
    world_size: int,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
) -> BatchSizes:
    """Derive the missing batch size from the given ones; ValueError when they cannot agree.

    Any two of (global, micro, accumulation) determine the third. Given only the global batch, accumulation
    is 1; given only one of micro/accumulation, the other defaults (micro 8, accumulation 1).
    """
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("micro_batch_size", micro_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    g, m, a = global_batch_size, micro_batch_size, gradient_accumulation_steps
    if g is None:
        m = m or DEFAULT_MICRO_BATCH_SIZE
        a = a or 1
        g = m * a * world_size
    elif m is None:
        a = a or 1
        if g % (a * world_size):
            raise ValueError(
                f"global batch {g} is not divisible by gradient_accumulation_steps {a} × world size "
                f"{world_size}: choose a global batch that is a multiple of {a * world_size}"
            )
        m = g // (a * world_size)
    elif a is None:
        if g % (m * world_size):
            raise ValueError(
                f"global batch {g} is not divisible by micro batch {m} × world size {world_size}: "
                f"choose a global batch that is a multiple of {m * world_size}"
            )
        a = g // (m * world_size)
    if g != m * a * world_size:
        raise ValueError(
            f"global batch {g} != micro batch {m} × gradient accumulation {a} × world size {world_size} "
            f"(= {m * a * world_size}): give at most two of the three, or make them agree"
        )
    return BatchSizes(g, m, a, world_size)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms]?)", re.IGNORECASE)
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration such as "2h", "90s", "1h30m", "45m" or a bare number of seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        compact = text.strip().replace(" ", "")
        if not compact or _DURATION.sub("", compact):
            raise ValueError(f"cannot read the duration {text!r}: write e.g. 2h, 90m, 45s or 1h30m")
        seconds = sum(float(n) * _SECONDS[u.lower()] for n, u in _DURATION.findall(compact))
    if seconds <= 0:
        raise ValueError(f"a time budget must be positive, got {text!r}")
    return seconds


def parse_profile_steps(text: str | None) -> tuple[int, int] | None:
    """``"A:B"`` → (A, B): profile optimizer steps A to B (1-based, inclusive); None for None."""
    if text is None:
        return None
    start, sep, stop = str(text).partition(":")
    if not (sep and start.strip().isdigit() and stop.strip().isdigit()) or not 1 <= int(start) <= int(stop):
        raise ValueError(
            f"profile_steps {text!r}: write START:STOP, the first and last step to profile (1-based), "
            "e.g. 20:24 (a few steps after compilation and warm-up)"
        )
    return int(start), int(stop)


def check_compile_options(options, compile: bool | None = None) -> list[str]:
    """What is wrong with ``TrainConfig.compile_options``: each name must be one of ``torch._inductor.config``
    with a value of its type (torch.compile would refuse it on every rank, after the launch). Imports Inductor's
    config (~1.5 s) only when there are options to check."""
    if not isinstance(options, dict):
        return [f"compile_options must be an object of Inductor settings, got {options!r}"]
    if not options:
        return []
    if compile is False:
        return ["compile_options are settings of the compilation, which compile false turns off"]
    from torch._inductor import config as inductor

    known = inductor.get_config_copy()
    problems = []
    for name, value in options.items():
        key = name.replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            problems.append(f"compile_options: {name!r} is not an Inductor setting of this torch{hint}")
            continue
        wanted = type(known[key])
        if known[key] is not None and not isinstance(value, wanted):
            problems.append(
                f"compile_options: {name} takes a {wanted.__name__} (it is {known[key]!r}), got {value!r}"
            )
    return problems


def inductor_random_4x() -> bool:
    """Whether this torch's Inductor draws CUDA random numbers along its "4x" path (torch 2.13: four values of
    one Philox call per element group, but only in kernels it generates as 1-D). Its forward and its backward
    can then draw a dropout mask in kernels of different shapes, i.e. different masks, and the gradient is not
    the loss's (pytorch/pytorch#198333, open when this was written; also 4 neighbouring elements sharing one
    mask in some 1-D kernels)."""
    try:
        from torch._inductor.codegen.triton import TritonOverrides
    except Exception:  # no Triton, no Inductor codegen for CUDA: nothing draws along that path
        return False
    return hasattr(TritonOverrides, "_can_use_4x_random")


def inductor_options(
    compile_options: dict | None, dropout: bool, device_type: str
) -> tuple[dict, str | None]:
    """The Inductor options a model is compiled with, and why bertpipe added any (a line for the log).

    ``compile_options`` as given, plus ``align_random_eager: true`` on CUDA for a model with dropout where
    Inductor has the 4x random path (``inductor_random_4x``) and the options leave the random numbers to it
    (neither ``align_random_eager`` nor ``fallback_random`` given): Inductor then draws every mask as eager
    PyTorch's dropout kernel does, a function of the element's index whatever the kernel's shape, so the
    forward's mask and the backward's agree (and equal eager's). ``{"align_random_eager": false}`` opts out.
    """
    options = dict(compile_options or {})
    if device_type != "cuda" or not dropout or not inductor_random_4x():
        return options, None
    if "align_random_eager" in options or "fallback_random" in options:
        return options, None
    options["align_random_eager"] = True  # arrived before the 4x path (test_this_torch_is_recognised)
    import torch

    return options, (
        f"compiling with align_random_eager=True: torch {torch.__version__}'s Inductor may otherwise draw "
        f"different dropout masks in the forward and the backward (pytorch/pytorch#198333); "
        f'compile_options {{"align_random_eager": false}} turns this off'
    )


def cuda_graphs(compile_options: dict) -> bool:
    """Whether ``compile_options`` turn on Inductor's CUDA graphs (what torch.compile's mode="reduce-overhead" sets)."""
    return isinstance(compile_options, dict) and bool(compile_options.get("triton.cudagraphs"))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. (seed, step, rank))."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class TrainConfig:
    """Everything one pretraining run needs; validated on construction."""

    examples: str  # finished `bertpipe examples` directory (train/ and valid/ Arrow shards)
    out: str  # run directory: checkpoints/, hf/, metrics.jsonl, tensorboard/
    model_config: str = "tiny"  # preset name (tiny/mini/small/base/large) or an HF config.json
    model_overrides: dict = field(default_factory=dict)  # BertConfig fields over the preset/file
    # DeepSpeed JSON ("auto" for what this config owns); None: ds_config.DEFAULT_DEEPSPEED_CONFIG
    deepspeed_config: str | None = None
    vocab: str | None = None  # vocab dir/vocab.txt; default: the vocab recorded in the examples manifest
    init_from: str | None = None  # phase 2: HF dir or checkpoint dir whose weights start this run
    # batch arithmetic: give at most two of the three (see resolve_batch_sizes)
    global_batch_size: int | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    # optimizer and schedule
    optimizer: str = "adamw"  # adamw (torch) or lamb (bert.optim.Lamb)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_steps: int = 0
    decay: str = "linear"  # linear | polynomial | constant after warmup
    decay_power: float = 1.0  # polynomial decay exponent
    min_lr_ratio: float = 0.0  # the decay ends at lr × min_lr_ratio
    schedule_steps: int | None = None  # length of the schedule; default max_steps
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto: whatever the DeepSpeed config enables (fp32 when it says "auto")
    compile: bool | None = None
    """torch.compile the model (through DeepSpeed's ``engine.compile()``); None: on CUDA yes, on the CPU no
    (compiling costs more there than it saves). Compiled losses equal eager ones within float rounding."""
    compile_options: dict = field(default_factory=dict)
    """Inductor settings for the compilation (torch.compile's ``options``: names of ``torch._inductor.config``),
    e.g. ``{"coordinate_descent_tuning": true}``; empty: Inductor's defaults. See ``check_compile_options``."""
    pack_multiple_of: int = 0
    """Round each batch's packed token count and predicted-position count up to a multiple of this, with fill
    rows the model ignores (0: exact sizes). Batches then share a few shapes: what CUDA graphs
    (``compile_options: {"triton.cudagraphs": true}``) need, which record one graph per shape. Costs the fill
    rows' compute (under ``pack_multiple_of`` / 2 tokens a batch on average); changes only random draws."""
    # how long
    max_steps: int | None = None  # optimizer steps counted from the start of training (not this run)
    time_budget: str | None = None  # wall time of this run, e.g. "2h", "90s"
    # data
    seed: int = 0  # data order, dynamic masking, dropout
    pad_to_multiple_of: int = 8
    bucket_batches: int = 0  # >1: sort windows of this many global batches by length (less padding)
    # checkpoints, evaluation, logging
    resume: bool = False
    save_every: int = 0  # steps; 0: only at the end (and on SIGTERM / time budget)
    keep_last: int = 2
    export_every: int = 0  # steps between HF exports; 0: only at the end
    eval_every: int = 0  # steps; 0: only at the end
    eval_samples: int = 256
    log_every: int = 1
    log_example_indices: bool = False  # OUT/data_log/rank{R}.jsonl: which examples each rank trained on
    progress_bar: bool = True
    tensorboard: bool = True
    profile_steps: str | None = None  # "A:B": torch.profiler over steps A..B into OUT/profile/

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.decay not in DECAYS:
            problems.append(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in (
            "warmup_steps",
            "save_every",
            "export_every",
            "eval_every",
            "bucket_batches",
            "pack_multiple_of",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("keep_last", "log_every", "eval_samples", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and self.time_budget is None:
            problems.append(
                "say how long to train: give max_steps (--max-steps) or time_budget (--time-budget)"
            )
        if self.time_budget is not None:
            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                problems.append(str(e))
        if self.decay != "constant" and self.total_schedule_steps is None:
            problems.append(
                f"a {self.decay} decay needs its length: give max_steps or schedule_steps, or decay 'constant'"
            )
        if self.total_schedule_steps is not None and self.warmup_steps > self.total_schedule_steps:
            problems.append(
                f"warmup_steps {self.warmup_steps} is longer than the schedule ({self.total_schedule_steps} steps)"
            )
        if self.compile not in (None, True, False):
            problems.append(f"compile must be true, false or null (auto: on CUDA only), got {self.compile!r}")
        problems += check_compile_options(self.compile_options, self.compile)
        if cuda_graphs(self.compile_options) and not self.pack_multiple_of:
            problems.append(
                "compile_options triton.cudagraphs records a CUDA graph per batch shape, and packed batches "
                "change size every step: set pack_multiple_of too (e.g. 1024) so they share a few shapes"
            )
        try:
            parse_profile_steps(self.profile_steps)
        except ValueError as e:
            problems.append(str(e))
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if problems:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))

    @property
    def total_schedule_steps(self) -> int | None:
        return self.schedule_steps if self.schedule_steps is not None else self.max_steps

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def batch_sizes(self, world_size: int) -> BatchSizes:
        return resolve_batch_sizes(
            world_size, self.global_batch_size, self.micro_batch_size, self.gradient_accumulation_steps
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config fields: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> TrainConfig:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"training config {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"training config {path} is not valid JSON: {e}") from None
        return cls.from_dict(values)
