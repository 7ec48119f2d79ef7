"""Optimizers (AdamW, LAMB) and the learning-rate schedule.

LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"),
in NVIDIA's formulation: Adam moments with bias correction, decoupled weight decay added to the update,
then a per-tensor trust ratio ||w|| / ||update|| scales the step.

Under DeepSpeed ZeRO-1/2 the optimizer does not see the model's tensors: each rank's param group is one
flat fp32 partition that spans many layers (ZeRO-3: one partition of each tensor per rank). The trust
ratio is then computed over that partition, not per layer, so LAMB under ZeRO is "per-partition LAMB":
it trains, but it is not the layer-wise algorithm of the paper, and it changes with the world size. For
faithful LAMB use ZeRO-0 (``zero0_*.json``), where every tensor is whole on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Never weight-decayed: these names (transformers' recipe) and every tensor under 2 dims (biases and norm
# scales whatever their module is called, as nanoGPT decides).
NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


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
        weight_norms = torch.stack(torch._foreach_norm(weights))
        update_norms = torch.stack(torch._foreach_norm(updates))
        # A zero norm (fresh zero-initialised bias, zero gradient) falls back to plain Adam-W.
        trust = torch.where(
            (weight_norms > 0) & (update_norms > 0),
            weight_norms / update_norms,
            torch.ones_like(weight_norms),
        )
        if group["max_trust_ratio"] is not None:
            trust = trust.clamp(max=group["max_trust_ratio"])
        torch._foreach_mul_(updates, list((-group["lr"] * trust).unbind()))
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
