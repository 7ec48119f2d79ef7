"""bert/optim.py and the batch arithmetic of bert/train_config.py: LAMB against a reference, LR schedules."""

from __future__ import annotations

import math

import pytest
import torch

from bert.optim import Lamb, PartitionLayout, build_optimizer, lr_multiplier, parameter_groups
from bert.pretrain.config import TrainConfig, derive_seed, parse_duration, resolve_batch_sizes


def reference_lamb(params, grads_fn, steps, lr, betas, eps, weight_decay):
    """LAMB as written in the paper (Algorithm 2, NVIDIA's bias-corrected form), one tensor at a time."""
    beta1, beta2 = betas
    params = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    trajectory = []
    for t in range(1, steps + 1):
        grads = grads_fn(params)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t)
            v_hat = v[i] / (1 - beta2**t)
            r = m_hat / (v_hat.sqrt() + eps) + weight_decay * p
            w_norm, r_norm = p.norm().item(), r.norm().item()
            trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            params[i] = p - lr * trust * r
        trajectory.append([p.clone() for p in params])
    return trajectory


def test_lamb_follows_the_reference_on_a_toy_regression():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    w0, b0 = torch.randn(5, 3) * 0.5, torch.zeros(3)  # a zero bias exercises the trust-ratio fallback

    def grads_of(params):
        w, b = (p.detach().clone().requires_grad_(True) for p in params)
        loss = ((x.double() @ w + b - y.double()) ** 2).mean()
        return torch.autograd.grad(loss, [w, b])

    reference = reference_lamb(
        [w0, b0], grads_of, steps=25, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01
    )
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    optimizer = Lamb([w, b], lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    for expected in reference:
        optimizer.zero_grad()
        ((x @ w + b - y) ** 2).mean().backward()
        optimizer.step()
        assert torch.allclose(w.double(), expected[0], atol=1e-5)
        assert torch.allclose(b.double(), expected[1], atol=1e-5)
    first_loss = ((x @ w0 + b0 - y) ** 2).mean()
    assert ((x @ w + b - y) ** 2).mean() < first_loss


class LoopLamb(Lamb):
    """bert.optim.Lamb's step before it ran over ``torch._foreach_*`` ops: one tensor at a time (the reference)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["bias_correction"]:
                    m_hat = exp_avg / (1 - beta1 ** state["step"])
                    v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
                else:
                    m_hat, v_hat = exp_avg, exp_avg_sq
                weight = p.float()
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(weight, alpha=group["weight_decay"])
                weight_norm = weight.norm()
                update_norm = update.norm()
                trust = torch.where(
                    (weight_norm > 0) & (update_norm > 0),
                    weight_norm / update_norm,
                    torch.ones_like(weight_norm),
                )
                if group["max_trust_ratio"] is not None:
                    trust = trust.clamp(max=group["max_trust_ratio"])
                p.add_((update * (-group["lr"] * trust)).to(p.dtype))


def _train_tiny_bert(make_optimizer, steps: int, skip_grad: str | None = None) -> dict[str, torch.Tensor]:
    """A few optimizer steps of a tiny BertForPreTraining (dropout off) from fixed weights and batches."""
    from bert.model import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForPreTraining(config).train()
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(5, 50, (4, 12), generator=generator)
        labels = torch.where(torch.rand(4, 12, generator=generator) < 0.3, ids, -100)
        out = model(ids, torch.ones_like(ids), labels=labels, next_sentence_label=torch.tensor([0, 1, 0, 1]))
        optimizer.zero_grad()
        out.loss.backward()
        if skip_grad is not None and step % 2:  # a tensor without gradient in some steps: its own step count
            dict(model.named_parameters())[skip_grad].grad = None
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_foreach_lamb_equals_the_per_tensor_loop_bitwise():
    # Several steps, weight decay on one of the two param groups (a third with its own lr, no bias correction
    # and a trust-ratio cap), and a tensor that misses its gradient every other step: bitwise equal on the CPU
    # (on CUDA the foreach norm and division kernels may round differently: expect 1-ulp differences there).
    def groups(model):
        decay, no_decay = parameter_groups(model, 0.01)
        last = decay["params"].pop()
        third = {
            "params": [last],
            "lr": 3e-3,
            "weight_decay": 0.1,
            "bias_correction": False,
            "max_trust_ratio": 0.5,
        }
        return [decay, no_decay, third]

    def make(cls):
        return lambda model: cls(groups(model), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)

    skip = "cls.seq_relationship.weight"
    reference = _train_tiny_bert(make(LoopLamb), steps=3, skip_grad=skip)
    vectorised = _train_tiny_bert(make(Lamb), steps=3, skip_grad=skip)
    initial = _train_tiny_bert(make(Lamb), steps=0)
    assert reference.keys() == vectorised.keys()
    for name, expected in reference.items():
        assert torch.equal(vectorised[name], expected), name
    assert not torch.equal(reference[skip], initial[skip])  # the skipped tensor still trained


def test_fused_adamw_matches_the_default_adamw():
    # build_optimizer turns fused on when CUDA is there; the CPU has the same fused kernel to check it against
    def make(fused):
        return lambda model: build_optimizer(model, "adamw", 1e-2, (0.9, 0.99), 1e-6, 0.01, fused=fused)

    fused, plain = _train_tiny_bert(make(True), steps=2), _train_tiny_bert(make(False), steps=2)
    initial = _train_tiny_bert(make(False), steps=0)
    for name, expected in plain.items():
        torch.testing.assert_close(fused[name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(plain[k], initial[k]) for k in plain)
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(model, "adamw", 1e-3, (0.9, 0.99), 1e-6, 0.0, fused=True).defaults["fused"]
    assert not build_optimizer(model, "adamw", 1e-3, (0.9, 0.99), 1e-6, 0.0, fused=False).defaults["fused"]


def test_lamb_step_size_is_lr_times_weight_norm():
    # The trust ratio makes each tensor's step ||lr * trust * r|| = lr * ||w||, whatever the gradient scale.
    for scale in (1e-3, 1.0, 1e3):
        w = torch.nn.Parameter(torch.full((4, 4), 2.0))
        optimizer = Lamb([w], lr=0.01, weight_decay=0.0)
        w.grad = torch.randn(4, 4) * scale
        before = w.detach().clone()
        optimizer.step()
        assert math.isclose((w.detach() - before).norm().item(), 0.01 * before.norm().item(), rel_tol=1e-4)


def test_parameter_groups_exclude_biases_and_layernorm_from_decay_and_count_tied_once():
    model = torch.nn.Sequential()
    model.add_module("dense", torch.nn.Linear(4, 4))
    model.add_module("LayerNorm", torch.nn.LayerNorm(4))
    model.add_module("tied", torch.nn.Linear(4, 4))
    model.tied.weight = model.dense.weight
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1  # dense.weight (tied.weight is the same tensor)
    assert len(no_decay["params"]) == 4  # dense.bias, LayerNorm.weight/bias, tied.bias
    assert isinstance(build_optimizer(model, "lamb", 1e-3, (0.9, 0.999), 1e-6, 0.01), Lamb)
    assert isinstance(build_optimizer(model, "adamw", 1e-3, (0.9, 0.999), 1e-6, 0.01), torch.optim.AdamW)


def test_lr_schedule_warms_up_linearly_then_decays():
    lrs = [lr_multiplier(s, warmup_steps=4, total_steps=12) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[8] == 0.5 and lrs[12] == 0.0 and lrs[13] == 0.0
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    poly = [lr_multiplier(s, 0, 10, "polynomial", power=2.0, min_ratio=0.1) for s in (0, 5, 10)]
    assert poly == pytest.approx([1.0, 0.1 + 0.9 * 0.25, 0.1])
    assert lr_multiplier(100, 0, None, "constant") == 1.0
    with pytest.raises(ValueError):
        lr_multiplier(3, 0, None, "linear")


@pytest.mark.parametrize(
    "given, expected",
    [
        (dict(global_batch_size=64, micro_batch_size=8), (64, 8, 4)),
        (dict(global_batch_size=64, gradient_accumulation_steps=2), (64, 16, 2)),
        (dict(micro_batch_size=8, gradient_accumulation_steps=3), (48, 8, 3)),
        (dict(global_batch_size=64, micro_batch_size=8, gradient_accumulation_steps=4), (64, 8, 4)),
        (dict(global_batch_size=16), (16, 8, 1)),
        (dict(), (16, 8, 1)),
    ],
)
def test_batch_arithmetic_derives_the_missing_size(given, expected):
    sizes = resolve_batch_sizes(2, **given)
    assert (sizes.global_batch_size, sizes.micro_batch_size, sizes.gradient_accumulation_steps) == expected
    assert sizes.global_batch_size == sizes.micro_batch_size * sizes.gradient_accumulation_steps * 2


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(global_batch_size=60, micro_batch_size=8), "not divisible"),
        (dict(global_batch_size=64, micro_batch_size=8, gradient_accumulation_steps=3), "!= micro batch"),
        (dict(global_batch_size=30, gradient_accumulation_steps=4), "not divisible"),
        (dict(micro_batch_size=0), "positive integer"),
    ],
)
def test_batch_arithmetic_refuses_inconsistent_sizes(given, message):
    with pytest.raises(ValueError, match=message):
        resolve_batch_sizes(2, **given)


def test_durations_seeds_and_config_validation():
    assert parse_duration("2h") == 7200 and parse_duration("90s") == 90 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    for bad in ("2 hours", "h", "-5s", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    with pytest.raises(ValueError) as e:
        TrainConfig(examples="e", out="o", optimizer="sgd", time_budget="soon")
    assert (
        "optimizer" in str(e.value)
        and "duration" in str(e.value)
        and "decay needs its length" in str(e.value)
    )
    with pytest.raises(ValueError, match="how long"):
        TrainConfig(examples="e", out="o", decay="constant")
    config = TrainConfig(examples="e", out="o", max_steps=10, warmup_steps=2)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_lamb_over_a_flat_partition_with_its_layout_is_the_per_tensor_lamb():
    # What ZeRO-1/2 hand LAMB on one rank: one flat fp32 tensor holding every tensor of a group (then padding).
    # With the layout, its trust ratios are per tensor again: bitwise the LAMB of the separate tensors.
    torch.manual_seed(0)
    tensors = [torch.randn(4, 3), torch.randn(5), torch.zeros(2)]  # a zero tensor: trust 1 (plain Adam-W)
    grads = [[torch.randn_like(t) for t in tensors] for _ in range(3)]
    separate = [t.clone() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.zeros(3)])  # 3 elements of padding
    layout, start = [], 0
    for i, t in enumerate(tensors):
        layout.append((start, t.numel(), i))
        start += t.numel()
    per_tensor = Lamb(separate, lr=0.1, weight_decay=0.01)
    partitioned = Lamb([flat], lr=0.1, weight_decay=0.01)
    partitioned.set_partition_layouts({id(flat): PartitionLayout(layout, num_tensors=len(tensors))})
    whole = Lamb([flat.clone()], lr=0.1, weight_decay=0.01)  # no layout: one trust ratio for everything
    for step in grads:
        for t, g in zip(separate, step, strict=True):
            t.grad = g
        flat.grad = torch.cat([g.reshape(-1) for g in step] + [torch.zeros(3)])
        whole.param_groups[0]["params"][0].grad = flat.grad.clone()
        per_tensor.step(), partitioned.step(), whole.step()
    assert torch.equal(flat[:start], torch.cat([t.reshape(-1) for t in separate]))
    assert torch.equal(flat[start:], torch.zeros(3))  # the padding stays zero
    assert not torch.allclose(whole.param_groups[0]["params"][0][:start], flat[:start])
    assert PartitionLayout([(2, 3, 0), (7, 1, 1)], 2).gaps(10) == [(0, 2), (5, 2), (8, 2)]
    with pytest.raises(ValueError, match="name no parameter"):
        partitioned.set_partition_layouts({id(separate[0]): PartitionLayout(layout, 3)})
