"""Optimizers (AdamW, LAMB) and the learning-rate schedule.

LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"),
in NVIDIA's formulation: Adam moments with bias correction, decoupled weight decay added to the update,
then a per-tensor trust ratio ||w|| / ||update|| scales the step.

Under DeepSpeed ZeRO-1/2 the optimizer does not see the model's tensors: each rank's param group is one
flat fp32 partition that spans many layers, and a layer may be split between two ranks' partitions. The
engine tells LAMB where each layer lies in each partition (``Lamb.set_partition_layouts``, from DeepSpeed's
fragment addresses): the trust ratio is then per layer again, its two norms summed over the ranks (one
all-reduce of a vector of squared norms per group, on the device), so ZeRO-1/2 LAMB is the paper's layer-wise
LAMB on any number of ranks. ZeRO-3 partitions every tensor itself: there the trust ratio is per partition
of a tensor (it trains, but it is not the layer-wise algorithm; use ZeRO-0, 1 or 2 for faithful LAMB).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Never weight-decayed: these names (transformers' recipe) and every tensor under 2 dims (biases and norm
# scales whatever their module is called, as nanoGPT decides).
NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


@dataclass
class PartitionLayout:
    """Where the model's tensors lie in one flat partition that an optimizer steps (ZeRO-1/2).

    ``fragments``: (start, numel, tensor index) of each tensor's piece in this partition, the index counting
    the model's parameters (the same numbering on every rank); the rest of the partition is padding.
    ``num_tensors``: how many parameters the model has. ``group``: the ranks whose partitions together hold
    every tensor whole (None: this partition holds each of its tensors whole).
    """

    fragments: list[tuple[int, int, int]]
    num_tensors: int
    group: object = None

    def __post_init__(self):
        self._index: dict[torch.device, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor:
        """The fragments' tensor indices on ``device`` (copied there once, not at every step)."""
        if device not in self._index:
            self._index[device] = torch.tensor([t for _, _, t in self.fragments], device=device)
        return self._index[device]

    def gaps(self, numel: int) -> list[tuple[int, int]]:
        """(start, numel) of the partition's stretches that belong to no tensor (alignment padding)."""
        out, at = [], 0
        for start, length, _ in sorted(self.fragments):
            if start > at:
                out.append((at, start - at))
            at = start + length
        return out + ([(at, numel - at)] if numel > at else [])


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive moments (LAMB) for CPU and GPU tensors; see the module docstring for ZeRO.

    One ``step`` runs each operation over all tensors of a param group at once (``torch._foreach_*``: a few
    kernels per group, not a dozen per tensor), with every value as the per-tensor formulation computes it
    (tests/test_optim.py keeps that loop as the reference). It holds two fp32 temporaries per parameter
    during a step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        max_trust_ratio: float | None = None,
    ):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_trust_ratio=max_trust_ratio,
        )
        super().__init__(params, defaults)
        self.partition_layouts: dict[int, PartitionLayout] = {}  # id of a flat partition -> its layout

    def set_partition_layouts(self, layouts: dict[int, PartitionLayout]) -> None:
        """Per flat partition this optimizer steps (by ``id``), where the model's tensors lie in it: the trust
        ratio is then computed per tensor, over all ranks (see the module docstring)."""
        ours = {id(p) for group in self.param_groups for p in group["params"]}
        unknown = set(layouts) - ours
        if unknown:
            raise ValueError(f"{len(unknown)} partition layouts name no parameter of this optimizer")
        self.partition_layouts = dict(layouts)

    @torch.no_grad()
    def step(self, closure=None):
        """One LAMB update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad.float() for p in params]
        exp_avgs, exp_avg_sqs, bias1, bias2 = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            # a tensor's step can differ from its group's (it had no gradient in some steps)
            bias1.append(1 - beta1 ** state["step"] if group["bias_correction"] else 1.0)
            bias2.append(1 - beta2 ** state["step"] if group["bias_correction"] else 1.0)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        del grads
        updates = torch._foreach_div(exp_avgs, bias1)  # m_hat
        denominators = torch._foreach_div(exp_avg_sqs, bias2)  # v_hat
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_div_(updates, denominators)  # m_hat / (sqrt(v_hat) + eps)
        del denominators
        weights = [p.float() for p in params]
        if group["weight_decay"]:
            torch._foreach_add_(updates, weights, alpha=group["weight_decay"])
        # The trust ratio's norms are per model tensor: a whole parameter, or its fragments in a partition.
        w_views, u_views, gap_updates, spread = [], [], [], []
        for i, (w, u) in enumerate(zip(weights, updates, strict=True)):
            layout = self.partition_layouts.get(id(params[i]))
            if layout is None and self.partition_layouts:
                raise ValueError("LAMB has partition layouts but steps a tensor without one: relay them out")
            if layout is None:
                w_views.append(w)
                u_views.append(u)
                continue
            for start, length, _ in layout.fragments:
                w_views.append(w.narrow(0, start, length))
                u_views.append(u.narrow(0, start, length))
            gap_updates += [u.narrow(0, start, length) for start, length in layout.gaps(u.numel())]
            spread.append(layout)
        weight_norms = torch.stack(torch._foreach_norm(w_views))
        update_norms = torch.stack(torch._foreach_norm(u_views))
        if any(layout.group is not None for layout in spread):
            # a tensor's norms: its squared norms summed over its fragments on every rank
            if len(spread) != len(params):
                raise ValueError("a param group mixes partitions spread over ranks with whole tensors")
            index = torch.cat([layout.index(weight_norms.device) for layout in spread])
            squares = weight_norms.new_zeros(2, spread[0].num_tensors)
            squares[0].index_add_(0, index, weight_norms.square())
            squares[1].index_add_(0, index, update_norms.square())
            if dist.get_backend(spread[0].group) == "nccl" and not squares.is_cuda:  # an offloaded partition
                on_gpu = squares.cuda()
                dist.all_reduce(on_gpu, group=spread[0].group)
                squares = on_gpu.to(squares.device)
            else:
                dist.all_reduce(squares, group=spread[0].group)
            weight_norms, update_norms = squares.sqrt().index_select(1, index).unbind()
        # A zero norm (fresh zero-initialised bias, zero gradient) falls back to plain Adam-W.
        trust = torch.where(
            (weight_norms > 0) & (update_norms > 0),
            weight_norms / update_norms,
            torch.ones_like(weight_norms),
        )
        if group["max_trust_ratio"] is not None:
            trust = trust.clamp(max=group["max_trust_ratio"])
        torch._foreach_mul_(u_views, list((-group["lr"] * trust).unbind()))
        if gap_updates:  # padding has no tensor: its (zero) update gets the learning rate alone
            torch._foreach_mul_(gap_updates, -group["lr"])
        torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(updates, params, strict=True)])


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: decayed weights, and biases/LayerNorm parameters (``NO_DECAY_SUFFIXES``, or fewer
    than 2 dims) without weight decay. Pretraining and fine-tuning both group this way."""
    decay, no_decay = [], []
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW (torch) or LAMB over ``parameter_groups(model)``.

    ``fused``: AdamW's single-kernel update; None turns it on when CUDA is available (the parameters are
    still on the CPU when the optimizer is built: DeepSpeed moves them, the same tensors, to the GPU).
    """
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        if fused is None:
            fused = torch.cuda.is_available()
        return torch.optim.AdamW(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
        )
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose adamw or lamb")


def lr_multiplier(
    step: int,
    warmup_steps: int,
    total_steps: int | None,
    decay: str = "linear",
    power: float = 1.0,
    min_ratio: float = 0.0,
) -> float:
    """The factor on the peak lr for optimizer step ``step`` (0-based): linear warmup, then decay.

    Warmup reaches the peak at step ``warmup_steps - 1``; linear / polynomial decay then falls to
    ``min_ratio`` at ``total_steps`` and stays there; "constant" keeps the peak. The one schedule of
    pretraining (the engine asks for the step it is about to take) and fine-tuning (a LambdaLR, which asks
    for step 0 before the first update, then 1, 2, ...).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps and step < warmup_steps:
        # (step + 1) / warmup, not step / warmup (Google's BERT, transformers' get_linear_schedule_with_warmup):
        # both callers ask for the lr of the update about to be made, so step / warmup would spend the first
        # batch on an update of lr 0 that moves no weight (nanochat's warmup; torchtitan also avoids lr 0).
        # From step ``warmup_steps`` on, the linear decay equals transformers' step for step.
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay not in ("linear", "polynomial"):
        raise ValueError(f"unknown decay {decay!r}")
    if total_steps is None:
        raise ValueError(f"a {decay} decay needs total_steps")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    exponent = 1.0 if decay == "linear" else power
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) ** exponent
