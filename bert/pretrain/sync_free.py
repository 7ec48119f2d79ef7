"""DeepSpeed's bf16 optimizer step with fewer waits for the device: the same update, decided on the GPU.

``deepspeed_configs/zero1_bf16.json`` (ZeRO-0/1, bf16 weights, fp32 gradient accumulation) runs DeepSpeed's
``BF16_Optimizer``. Its ``step`` norms the gradients tensor by tensor (a kernel each: 206 for BERT-base), reads
the norm back to skip the step when it is not finite, reads the clip factor back to decide whether to clip, and
multiplies the gradients tensor by tensor: two waits for the GPU and ~420 small kernels every step, after
which the GPU idles while the host catches up. ``install`` gives one such optimizer a step with the same
arithmetic and at most one read:

- the norm over each group's flat fp32 gradient buffer (one ``_foreach_norm``), as DeepSpeed's over the
  tensors of the buffer (the gradients are all-reduced before the step, so every rank norms the same buffer);
- the clip factor ``min(1, clip / (norm + 1e-6))`` always applied: where DeepSpeed would not clip, the factor
  is exactly 1 and the product exactly the gradient;
- a non-finite norm skips the step, as DeepSpeed skips it (weights, moments and step count stay as they were,
  the gradients are cleared). Under fused AdamW (bertpipe's AdamW on CUDA) the skip happens inside the update
  (its ``found_inf``, as ``torch.amp.GradScaler`` skips), so the step reads nothing back; DeepSpeed's
  ``skipped_steps`` then does not count such a step, and the logged ``grad_norm`` is inf or nan. Any other
  optimizer (LAMB) reads the norm's finiteness back once and skips on the host, as DeepSpeed does.

``install`` also gives it the addition of the bf16 gradients into their fp32 buffers after backward as one
add a parameter group, the gradients laid end to end (DeepSpeed's default, without ``immediate_grad_update``;
the fallback, and that setting's hook, add tensor by tensor, bf16 read directly); either way each sum is
computed in fp32, so the values are the same to the bit. DeepSpeed's converts every gradient to a temporary
fp32 copy first, in a Python loop over the tensors: two kernels and a temporary per tensor (1.7 ms of an
H200's BERT-base step on the device, 2.9 ms on the host, measured 2026-12-04; a ``_foreach_add_`` of bf16 into
fp32, which followed, is still a kernel per tensor: 1.06 ms a step of that kernel in the next profile). Its
``clear_lp_grads`` (before each backward, in DeepSpeed's backward prologue) drops the bf16 gradients where
DeepSpeed's zeroes them: autograd then hands the next micro batch's gradients over as they are instead of
adding them into zeros.

It applies where DeepSpeed's optimizer is the plain ``BF16_Optimizer`` it was written against (fp32 gradients;
no MoE, Muon or model parallelism); anything else keeps DeepSpeed's own step. ``tests/test_sync_free.py`` holds
it to DeepSpeed's step, with AdamW and LAMB, on one rank and on two.
"""

from __future__ import annotations

import types

import torch

CLIP_EPS = 1e-6  # DeepSpeed's clip_tensors_by_global_norm: clip / (norm + eps)
# What the step below uses of DeepSpeed's BF16_Optimizer (checked, so another DeepSpeed keeps its own step)
_NEEDED = ("fp32_groups_gradients_flat", "fp32_groups_flat_partition", "fp32_groups_gradient_flat_partition",
           "update_lp_params", "clear_hp_grads", "clear_lp_grads", "_lazy_init_hp_params_optimizer_state",
           "clip_grad", "grad_acc_dtype", "optimizer", "_update_hp_grad", "fp32_groups_gradients",
           "fp32_groups_has_gradients", "update_hp_grads", "bf16_groups")  # fmt: skip


def applies(ds_optimizer, base_optimizer: torch.optim.Optimizer) -> str | None:
    """None where ``install`` can take over ``ds_optimizer``'s step, else why not."""
    if type(ds_optimizer).__name__ != "BF16_Optimizer":
        return f"DeepSpeed runs {type(ds_optimizer).__name__}, not BF16_Optimizer"
    missing = [name for name in _NEEDED if not hasattr(ds_optimizer, name)]
    if missing:
        return f"this DeepSpeed's BF16_Optimizer lacks {', '.join(missing)}"
    if getattr(ds_optimizer, "has_moe_layers", False) or getattr(ds_optimizer, "_uses_muon", False):
        return "MoE or Muon parameter groups"
    if getattr(ds_optimizer, "mpu", None) is not None:
        return "model parallelism"
    if getattr(ds_optimizer, "autoep_folding_tp_group", None) is not None:
        return "expert-parallel gradient folding"
    if ds_optimizer.grad_acc_dtype is not torch.float32:
        return f"gradients accumulate in {ds_optimizer.grad_acc_dtype}, not fp32"
    if ds_optimizer.optimizer is not base_optimizer:
        return "DeepSpeed wraps another optimizer than bertpipe's"
    return None


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step itself, on the device (fused Adam/AdamW's ``found_inf``)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(
        optimizer.defaults.get("fused")
    )


def install(ds_optimizer, base_optimizer: torch.optim.Optimizer) -> bool:
    """Give ``ds_optimizer`` (a DeepSpeed BF16_Optimizer) the step with fewer syncs; False where it does not apply."""
    if applies(ds_optimizer, base_optimizer) is not None:
        return False
    ds_optimizer.step = types.MethodType(_step, ds_optimizer)
    ds_optimizer._update_hp_grad = types.MethodType(_update_hp_grad, ds_optimizer)
    ds_optimizer.update_hp_grads = types.MethodType(_update_hp_grads, ds_optimizer)
    ds_optimizer.clear_lp_grads = types.MethodType(_clear_lp_grads, ds_optimizer)
    ds_optimizer._bertpipe_tiled = [  # which groups' gradient views tile their flat buffer (_update_hp_grads)
        _tiles(flat, views)
        for flat, views in zip(
            ds_optimizer.fp32_groups_gradients_flat, ds_optimizer.fp32_groups_gradients, strict=True
        )
    ]
    return True


def uninstall(ds_optimizer) -> None:
    """Give ``ds_optimizer`` back DeepSpeed's own step and gradient hook (benchmarks and tests compare them)."""
    for name in ("step", "_update_hp_grad", "update_hp_grads", "clear_lp_grads"):
        if isinstance(ds_optimizer.__dict__.get(name), types.MethodType):
            delattr(ds_optimizer, name)  # the class's: DeepSpeed's


def _hp_grad_for(self, lp, group_idx: int, param_idx: int) -> torch.Tensor:
    """The fp32 gradient buffer of ``lp`` (a view of the flat one), marked as holding a gradient, as DeepSpeed's
    ``_update_hp_grad`` marks it."""
    hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
    lp._hp_grad = hp_grad
    self.fp32_groups_has_gradients[group_idx][param_idx] = True
    return hp_grad


@torch.no_grad()
def _update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads) -> None:
    """DeepSpeed's ``BF16_Optimizer._update_hp_grad`` (no expert folding) with the fp32 add reading the bf16
    gradient directly."""
    if lp.grad is None:
        return
    hp_grad = _hp_grad_for(self, lp, group_idx, param_idx)
    hp_grad.add_(lp.grad.view(hp_grad.shape))  # bf16 -> fp32 is exact; the sum is in fp32, as DeepSpeed's
    if clear_lp_grads:
        lp.grad.zero_()


@torch.no_grad()
def _update_hp_grads(self, clear_lp_grads=False) -> None:
    """DeepSpeed's ``BF16_Optimizer.update_hp_grads`` (no expert folding), a group at a time. Where every
    parameter of a group has a gradient, the bf16 gradients are laid end to end (one ``torch.cat``) and added
    into the group's flat fp32 buffer at once, since its per-tensor views lie end to end in the same order: one
    kernel where adding bf16 into fp32 tensor by tensor (``_foreach_add_`` of mixed types included) is one a
    tensor, 206 for BERT-base. The sums are the same to the bit (each element rounded once, in fp32)."""
    if getattr(self, "immediate_grad_update", False):
        return
    for i, group in enumerate(self.bf16_groups):
        indexed = [(j, lp) for j, lp in enumerate(group) if lp.grad is not None]
        if not indexed:
            continue
        hp_grads = [_hp_grad_for(self, lp, i, j) for j, lp in indexed]
        flat = self.fp32_groups_gradients_flat[i]
        if len(indexed) == len(group) and self._bertpipe_tiled[i]:
            total = sum(hp.numel() for hp in hp_grads)
            flat.narrow(0, 0, total).add_(torch.cat([lp.grad.reshape(-1) for _, lp in indexed]))
        else:
            torch._foreach_add_(
                hp_grads, [lp.grad.view(hp.shape) for hp, (_, lp) in zip(hp_grads, indexed, strict=True)]
            )
    if clear_lp_grads:
        _clear_lp_grads(self)


def _clear_lp_grads(self, set_to_none: bool = True) -> None:
    """DeepSpeed's ``clear_lp_grads`` (its backward prologue's, and the step's), dropping the bf16 gradients
    rather than zeroing them: the next backward then hands each parameter its gradient as it comes, where into a
    kept zeroed one autograd adds it, a kernel a tensor (their sums are in the fp32 buffers by then)."""
    for group in self.bf16_groups:
        for lp in group:
            lp.grad = None


def _tiles(flat: torch.Tensor, views: list[torch.Tensor]) -> bool:
    """Whether ``views`` tile the start of ``flat`` in order (DeepSpeed lays out its fp32 gradient buffers so)."""
    offset = 0
    for view in views:
        if not view.is_contiguous() or view.data_ptr() != flat.data_ptr() + offset * flat.element_size():
            return False
        offset += view.numel()
    return offset <= flat.numel()


@torch.no_grad()
def _step(self, closure=None) -> None:
    """BF16_Optimizer.step with the clip, and under fused AdamW the norm test, decided on the device (see the
    module's docstring)."""
    if closure is not None:
        raise NotImplementedError(f"{type(self).__name__} does not support closure.")
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.fp32_groups_gradients_flat)))
    self._global_grad_norm = norm
    found_inf = (~torch.isfinite(norm)).float()
    on_device = skips_on_device(self.optimizer)
    self.overflow = False if on_device else bool(found_inf)  # the one read, for optimizers without found_inf
    if self.overflow:  # DeepSpeed's skip
        self._global_grad_norm = float("inf")
        self.clear_hp_grads()
        self.clear_lp_grads()
        return
    partitions = self.fp32_groups_gradient_flat_partition
    if self.clip_grad > 0.0:
        factor = torch.clamp(self.clip_grad / (norm + CLIP_EPS), max=1.0)
        torch._foreach_mul_(partitions, factor)
    for param, grad in zip(self.fp32_groups_flat_partition, partitions, strict=True):
        param.grad = grad  # fp32, as the master partition (``applies``)
    if on_device:
        self.optimizer.found_inf = found_inf
    try:
        self.optimizer.step()
    finally:
        if on_device:
            del self.optimizer.found_inf
    self._lazy_init_hp_params_optimizer_state()
    self.update_lp_params()
    self.clear_hp_grads()
