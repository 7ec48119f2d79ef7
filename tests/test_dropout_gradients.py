"""Dropout under torch.compile: the gradient is the derivative of the loss the forward computed.

Inductor draws dropout masks from a seed inside the kernels it generates, and may draw a mask again in the
backward instead of saving it. If the two draws differ (torch 2.13's "4x" random path, when the forward's and
the backward's kernels have different shapes: pytorch/pytorch#198333), the gradient belongs to another mask,
silently: training goes on. The check here: along the gradient's own direction, the central difference of the
loss (each evaluation seeded alike: the same masks) equals the gradient's norm. A backward with masks of its
own misses it by 10% on the model below (dropout 0.5); a right one by 1.3e-5 eagerly and 8.2e-5 under Inductor
(fp32, CPU, with or without gradient checkpointing).

On the CPU the check runs eagerly and under Inductor (which never takes the 4x path there); ``test_gpu.py``
runs it on CUDA with the options bertpipe compiles with (``bert.pretrain.config.inductor_options``).
"""

from __future__ import annotations

import pytest
import torch
from test_compile import batch

from bert.model import BertConfig, BertForPreTraining
from bert.pretrain import config as pretrain_config
from bert.pretrain import engine as eng

# dropout 0.5: half of every mask differs between two draws, so a wrong mask cannot hide in the rounding
DROPOUT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=16, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)  # fmt: skip


def derivative_along_gradient(model, inputs: dict, seed: int, eps: float = 1e-3) -> tuple[float, float]:
    """(|g|, the central difference of the loss along g/|g|) for the gradient g of the loss at ``seed``.

    Every forward runs with grad enabled (the training graph, whose kernels draw the masks) after
    ``torch.manual_seed(seed)``, so all three see the same masks. Equal up to O(eps²) and rounding when the
    backward differentiated the forward's masks."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**inputs).loss.backward()
    grads = [p.grad.detach().double() for p in params]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    direction = [(g / norm).to(p.dtype) for g, p in zip(grads, params, strict=True)]

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(d, alpha=step)
        torch.manual_seed(seed)
        loss = float(model(**inputs).loss.detach())
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(d, alpha=step)
        return loss

    return float(norm), (loss_at(eps) - loss_at(-eps)) / (2 * eps)


def relative_miss(model, inputs) -> float:
    norm, difference = derivative_along_gradient(model, inputs, seed=7)
    return abs(difference - norm) / norm


class _FreshMask(torch.autograd.Function):
    """Dropout whose backward draws a mask of its own: the fault the check exists for."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        return x * (torch.rand_like(x) >= p) / (1 - p)

    @staticmethod
    def backward(ctx, grad):
        return grad * (torch.rand_like(grad) >= ctx.p) / (1 - ctx.p), None


class FreshMaskDropout(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return _FreshMask.apply(x, self.p) if self.training else x


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_eager_gradient_is_the_derivative_of_the_loss_with_dropout(checkpointing):
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**DROPOUT, gradient_checkpointing=checkpointing)).train()
    assert relative_miss(model, batch(0)) < 1e-3


def test_the_check_fails_for_a_backward_that_draws_its_own_mask():
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**DROPOUT)).train()
    replaced = 0
    for module in model.modules():
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout, replaced = FreshMaskDropout(module.dropout.p), replaced + 1
    assert replaced == 1 + 2 * DROPOUT["num_hidden_layers"]  # embeddings, and two a layer
    assert relative_miss(model, batch(0)) > 0.05


@pytest.mark.slow
def test_the_inductor_gradient_is_the_derivative_of_the_loss_with_dropout():
    """Inductor on the CPU (its seeds, its recomputation in the backward), blocks recomputed in the backward
    (gradient checkpointing: the forward's masks drawn again), with the options bertpipe would compile with."""
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**DROPOUT, gradient_checkpointing=True)).train()
    options, _ = pretrain_config.inductor_options({}, dropout=True, device_type="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(model, options=options)
    assert relative_miss(compiled, batch(0)) < 1e-3


# --- the options bertpipe compiles with --------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, dropout, device, has_4x, expected",
    [
        ({}, True, "cuda", True, {"align_random_eager": True}),
        ({"coordinate_descent_tuning": True}, True, "cuda", True,
         {"coordinate_descent_tuning": True, "align_random_eager": True}),
        ({"align_random_eager": False}, True, "cuda", True, {"align_random_eager": False}),  # the opt-out
        ({"fallback_random": True}, True, "cuda", True, {"fallback_random": True}),  # eager's masks anyway
        ({}, False, "cuda", True, {}),  # no dropout, no masks
        ({}, True, "cpu", True, {}),  # the CPU never takes the 4x path
        ({}, True, "cuda", False, {}),  # a torch without it (2.12 and older)
    ],
)  # fmt: skip
def test_align_random_eager_is_added_where_inductor_could_draw_two_masks(
    monkeypatch, given, dropout, device, has_4x, expected
):
    monkeypatch.setattr(pretrain_config, "inductor_random_4x", lambda: has_4x)
    options, note = pretrain_config.inductor_options(given, dropout, device)
    assert options == expected
    assert given == {k: v for k, v in expected.items() if k in given}  # not changed in place
    added = options.get("align_random_eager") and "align_random_eager" not in given
    assert (note is not None) == bool(added)
    if added:
        assert "pytorch/pytorch#198333" in note and '{"align_random_eager": false}' in note


def test_this_torch_is_recognised():
    """On the torch the suite runs with, the probe answers without raising, and where it sees the 4x path
    Inductor has the setting that avoids it."""
    import torch._inductor.config as inductor_config

    if pretrain_config.inductor_random_4x():
        assert hasattr(inductor_config, "align_random_eager")


@pytest.mark.slow
def test_the_engine_compiles_with_those_options(monkeypatch, caplog):
    """The engine asks inductor_options with the model's dropout and its device, and compiles with the answer."""
    from test_compile import TINIEST

    eng.init_distributed()
    asked, seen = [], []

    def options(compile_options, dropout, device_type):
        asked.append((compile_options, dropout, device_type))
        note = "compiling with align_random_eager=True: a note"
        return {**compile_options, "align_random_eager": True}, note

    def recording_backend(gm, example_inputs, **kwargs):
        seen.append(kwargs)
        return gm.forward

    monkeypatch.setattr(eng, "inductor_options", options)
    monkeypatch.setattr(eng.Engine, "compile_backend", staticmethod(recording_backend))
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}}  # fmt: skip
    torch._dynamo.reset()
    model = BertForPreTraining(BertConfig(**{**TINIEST, "hidden_dropout_prob": 0.1}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with caplog.at_level("INFO", logger="bert.pretrain.engine"):
        engine = eng.Engine(model, optimizer, ds_config, lambda step: 1e-2, seed=0, compile=True,
                            compile_options={"coordinate_descent_tuning": True})  # fmt: skip
        engine.step([batch(1)]).fetch()
    assert asked == [({"coordinate_descent_tuning": True}, True, "cpu")]
    expected = {"options": {"coordinate_descent_tuning": True, "align_random_eager": True}}
    assert seen and all(kwargs == expected for kwargs in seen), seen
    assert "a note" in caplog.text
