"""The training engine: the only module that imports DeepSpeed.

The loop talks to ``Engine`` only: ``step(micro_batches) -> metrics``, ``evaluate``, ``save`` / ``load``,
``consolidated_state_dict``. The DeepSpeed JSON says "auto" for whatever the training config owns (batch
sizes, clipping, precision when the config names one, optimizer/scheduler params); ``fill_deepspeed_config``
fills those and refuses, listing every one, values that disagree with the training config. The optimizer
and the LR schedule are always bertpipe's (``bert.optim``), so CPU and GPU runs do the same math: an
"optimizer"/"scheduler" section in the JSON is checked against the training config, then dropped.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed picks an accelerator

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bert.train_config import BatchSizes, TrainConfig, derive_seed  # noqa: E402

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_DEEPSPEED_CONFIG = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": AUTO}}
OPTIMIZER_TYPES = {"adamw": ("adamw", "adam"), "lamb": ("lamb",)}


# --- the DeepSpeed config -------------------------------------------------------------------------------


def load_deepspeed_config(path: str | os.PathLike | None) -> dict:
    """The DeepSpeed JSON at ``path`` (a ZeRO-0 default when None)."""
    if path is None:
        return copy.deepcopy(DEFAULT_DEEPSPEED_CONFIG)
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None


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
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == AUTO:
            zero[key] = value
    ds.setdefault("steps_per_print", 1 << 30)  # bertpipe logs its own metrics
    ds.setdefault("wall_clock_breakdown", False)
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


# --- the process group ----------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a single process without the launcher becomes a world of one."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" not in os.environ:
            # A world of one needs no rendezvous: an in-memory store cannot lose a race for a TCP port.
            # DeepSpeed looks for the launcher's variables (else it tries MPI); the port is never opened.
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0"
            )
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    dist.barrier()


def agree_stop(code: int) -> int:
    """The largest stop code over all ranks (0: go on), so every rank stops at the same step."""
    t = torch.tensor([code], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj):
    """rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- the engine -----------------------------------------------------------------------------------------


class Engine:
    """A DeepSpeed engine around a BertForPreTraining, with bertpipe's optimizer and LR schedule."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ds_config: dict,
        lr_at: Callable[[int], float],
        seed: int,
    ):
        self.base_optimizer = optimizer
        self.lr_at = lr_at
        self.seed = seed
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.zero_stage = self.engine.zero_optimization_stage()
        self.precision = (
            "bf16" if self.engine.bfloat16_enabled() else "fp16" if self.engine.fp16_enabled() else "fp32"
        )
        self.device = self.engine.device

    @property
    def global_step(self) -> int:
        """Optimizer steps taken since the start of training (restored by ``load``)."""
        return self.engine.global_steps

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over this rank's micro batches; metrics averaged over all ranks."""
        step = self.global_step
        lr = self.lr_at(step)
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        # Dropout is seeded by (seed, step, rank), so a resumed run draws the same masks.
        torch.manual_seed(derive_seed(self.seed, step, self.rank))
        self.engine.train()
        totals = torch.zeros(9, dtype=torch.float64)
        own_grad_norm = None
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            out = self.engine(**batch)
            self.engine.backward(out.loss)
            if i == len(micro_batches) - 1 and self.zero_stage == 0 and self.precision == "fp32":
                own_grad_norm = _grad_norm(self.engine.module)  # DeepSpeed does not report it here
            self.engine.step()
            totals += _batch_sums(out, batch)
        assert self.global_step == step + 1, "DeepSpeed did not step at the accumulation boundary"
        dist.all_reduce(totals)
        metrics = _metrics_from_sums(totals, num_micro=len(micro_batches) * self.world_size)
        norm = self.engine.get_global_grad_norm() if own_grad_norm is None else own_grad_norm
        metrics["grad_norm"] = float(norm) if norm is not None else float("nan")
        metrics["lr"] = lr
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Losses and accuracies over this rank's evaluation batches, averaged over all ranks."""
        self.engine.eval()
        totals = torch.zeros(9, dtype=torch.float64)
        for batch in batches:
            batch = self._to_device(batch)
            totals += _batch_sums(self.engine(**batch), batch)
        dist.all_reduce(totals)
        count = torch.tensor([float(len(batches))])
        dist.all_reduce(count)
        return _metrics_from_sums(totals, num_micro=max(1, int(count.item())))

    def save(self, checkpoint_dir: str | os.PathLike, tag: str, client_state: dict) -> None:
        """DeepSpeed's checkpoint of model, optimizer and engine state, on every rank; ``latest`` → tag."""
        self.engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state)

    def load(self, checkpoint_dir: str | os.PathLike, tag: str | None = None) -> dict:
        """Restore a checkpoint (``latest`` when no tag); returns its client_state."""
        path, client_state = self.engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        if path is None:
            raise ValueError(f"no loadable checkpoint in {checkpoint_dir}")
        return client_state or {}

    def consolidated_state_dict(self, checkpoint_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
        """The full weights of a saved checkpoint (ZeRO partitions merged); call on one rank."""
        return checkpoint_state_dict(checkpoint_dir, tag)


def checkpoint_state_dict(
    checkpoint_dir: str | os.PathLike, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint (``latest`` when no tag).

    ZeRO-1/2/3 checkpoints: the fp32 master partitions merged (deepspeed.utils.zero_to_fp32). ZeRO-0: the
    module's weights, which under bf16/fp16 are the 16-bit working copy (cast to fp32).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        latest = checkpoint_dir / "latest"
        if not latest.exists():
            raise ValueError(
                f"{checkpoint_dir} has no 'latest' file: it is not a DeepSpeed checkpoint directory"
            )
        tag = latest.read_text().strip()
    files = sorted((checkpoint_dir / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ValueError(f"{checkpoint_dir / tag} holds no model states: not a DeepSpeed checkpoint")
    model_states = torch.load(files[0], map_location="cpu", weights_only=False)
    if model_states.get("param_shapes") is not None:  # written by a ZeRO optimizer
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:
        state = model_states["module"]
    return {k: v.detach().float() for k, v in state.items()}


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return (
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if grads
        else 0.0
    )


def _batch_sums(out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[loss, mlm_loss, nsp_loss, mlm_correct, mlm_count, nsp_correct, nsp_count, tokens, samples]."""
    mlm_correct = (out.mlm_logits.argmax(-1) == out.mlm_labels).sum() if out.mlm_labels is not None else 0
    nsp_correct = (out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum()
    values = [
        out.loss,
        out.mlm_loss,
        out.nsp_loss,
        mlm_correct,
        len(out.mlm_labels) if out.mlm_labels is not None else 0,
        nsp_correct,
        len(batch["next_sentence_label"]),
        batch["attention_mask"].sum(),
        len(batch["input_ids"]),
    ]
    return torch.tensor(
        [float(v.detach().float()) if torch.is_tensor(v) else float(v) for v in values], dtype=torch.float64
    )


def _metrics_from_sums(totals: torch.Tensor, num_micro: int) -> dict[str, float]:
    t = totals.tolist()
    return {
        "loss": t[0] / num_micro,
        "mlm_loss": t[1] / num_micro,
        "nsp_loss": t[2] / num_micro,
        "mlm_acc": t[3] / max(1.0, t[4]),
        "nsp_acc": t[5] / max(1.0, t[6]),
        "tokens": int(t[7]),
        "samples": int(t[8]),
    }
