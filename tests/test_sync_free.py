"""bertpipe's bf16 step (bert.pretrain.sync_free) against DeepSpeed's BF16_Optimizer.step it replaces.

The shipped zero1_bf16.json with fused AdamW and with LAMB: the same losses, gradient norms and fp32 master
weights as DeepSpeed's own step, on one rank and on two (partitions, all-gather), clipped or not; a non-finite
gradient skips the step as DeepSpeed skips it; and the step reads nothing back from the device under fused
AdamW, once under LAMB (DeepSpeed's: twice).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from bert import BertConfig, BertForPreTraining
from bert.optim import build_optimizer
from bert.pretrain import engine as eng
from bert.pretrain import sync_free
from bert.pretrain.config import BatchSizes, TrainConfig
from bert.pretrain.ds_config import fill_deepspeed_config, load_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=96, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
BATCH, SEQ = 4, 16


def make_engine(
    world_size: int,
    clip: float,
    sync_free_step: bool | None,
    optimizer: str = "adamw",
    fused: bool = True,
    accumulation: int = 1,
    deepspeed: str = "zero1_bf16",
    lr_at: Callable[[int], float] = lambda step: 1e-2,
    **engine_settings,
) -> eng.Engine:
    """A DeepSpeed engine of the tiny model under the shipped ``deepspeed_configs/DEEPSPEED.json``, the same
    weights every call; AdamW fused as bertpipe builds it on CUDA (the CPU default is the foreach one).
    ``sync_free_step``: bertpipe's step must be installed (True), DeepSpeed's put back (False), or either (None).
    ``engine_settings``: ``compile``, ``compile_options``, ``pack_multiple_of``, ``model_overrides`` (BertConfig fields)."""
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**{**MODEL, **engine_settings.get("model_overrides", {})}))
    train = TrainConfig(examples="unused", out="unused", lr=1e-2, max_steps=100, max_grad_norm=clip)
    sizes = BatchSizes(global_batch_size=BATCH * world_size * accumulation, micro_batch_size=BATCH,
                       gradient_accumulation_steps=accumulation, world_size=world_size)  # fmt: skip
    ds_json = load_deepspeed_config(REPO / "deepspeed_configs" / f"{deepspeed}.json")
    filled, _ = fill_deepspeed_config(ds_json, train, sizes, MODEL["hidden_size"])
    base = build_optimizer(model, optimizer, 1e-2, (0.9, 0.999), 1e-6, 0.01, fused=fused)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):
        engine = eng.Engine(model, base, filled, lr_at, seed=0, compile=engine_settings.get("compile", False),
                            compile_options=engine_settings.get("compile_options"),
                            pack_multiple_of=engine_settings.get("pack_multiple_of", 0))  # fmt: skip
    if sync_free_step:
        assert engine.sync_free_step, sync_free.applies(engine.engine.optimizer, base)
    elif sync_free_step is False:
        sync_free.uninstall(engine.engine.optimizer)
    return engine


def make_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(5, MODEL["vocab_size"], (BATCH, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2::5] = ids[:, 2::5]
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels, "next_sentence_label": torch.tensor([0, 1, 1, 0])}  # fmt: skip


def train(
    engine: eng.Engine, steps: int, rank: int = 0, poison_step: int | None = None, accumulation: int = 1
) -> dict:
    """Losses, gradient norms and optimizer state after ``steps`` (of ``accumulation`` micro batches); at
    ``poison_step`` one gradient is made inf."""
    losses, norms = [], []
    word_embeddings = engine.module.bert.embeddings.word_embeddings.weight
    for step in range(1, steps + 1):
        hook = None
        if step == poison_step:
            hook = word_embeddings.register_hook(
                lambda grad: grad.index_fill(0, torch.tensor([7]), float("inf"))
            )
        micro_batches = [make_batch(step + 100 * i, rank) for i in range(accumulation)]
        metrics = engine.step(micro_batches).fetch()
        if hook is not None:
            hook.remove()
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    ds_optimizer = engine.engine.optimizer
    state = ds_optimizer.optimizer.state
    return {
        "losses": losses,
        "norms": norms,
        "masters": [p.detach().clone() for p in ds_optimizer.fp32_groups_flat_partition],
        "bf16": [p.detach().clone() for p in engine.module.parameters()],
        "adam_steps": [float(state[p]["step"]) for p in ds_optimizer.fp32_groups_flat_partition],
    }


def assert_same_training(ours: dict, theirs: dict) -> None:
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5)
    finite = [(a, b) for a, b in zip(ours["norms"], theirs["norms"], strict=True) if math.isfinite(b)]
    assert [a for a, _ in finite] == pytest.approx([b for _, b in finite], rel=1e-5)
    for a, b in zip(ours["masters"], theirs["masters"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours["bf16"], theirs["bf16"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)  # bf16 roundings of the masters above
    assert ours["adam_steps"] == theirs["adam_steps"]


@pytest.fixture(scope="module")
def world_of_one():
    eng.init_distributed()
    yield


class _Reads(TorchDispatchMode):
    """Counts reads of a tensor's value (each a wait for the GPU when the tensor is on one)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_step_work(engine: eng.Engine, at_step: int) -> dict:
    """Wrap the DeepSpeed optimizer's step: at call ``at_step`` count its reads and its operators (the first
    call also links the optimizer's states, tensor by tensor, so count a later one)."""
    ds_optimizer, counts, calls = engine.engine.optimizer, {}, [0]
    step = ds_optimizer.step

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] != at_step:
            return step(*args, **kwargs)
        reads = _Reads()
        with reads, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(*args, **kwargs)
        ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        counts.update(
            reads=reads.count, launches=sum(1 for n in ops if n not in ("aten::to", "aten::detach"))
        )

    ds_optimizer.step = counted
    return counts


def test_unclipped_steps_train_as_deepspeeds_and_read_nothing_back(world_of_one):
    """clip 1e6: the gradients stay under it, so the factor is exactly 1. DeepSpeed's step reads the norm back
    twice and norms tensor by tensor; bertpipe's launches a fixed handful and reads nothing."""
    ours, theirs = make_engine(1, 1e6, sync_free_step=True), make_engine(1, 1e6, sync_free_step=False)
    assert ours.sync_free_step and type(ours.engine.optimizer).__name__ == "BF16_Optimizer"
    our_counts, their_counts = count_step_work(ours, 2), count_step_work(theirs, 2)
    result = train(ours, 4)
    assert_same_training(result, train(theirs, 4))
    assert max(result["norms"]) < 1e6
    tensors = len(list(ours.module.parameters()))  # 46
    assert our_counts["reads"] == 0 and their_counts["reads"] >= 2, (our_counts, their_counts)
    assert our_counts["launches"] <= 20 and their_counts["launches"] > tensors, (our_counts, their_counts)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_clipped_steps_and_a_non_finite_gradient_train_as_deepspeeds(world_of_one, optimizer):
    """clip 1e-3: every step clips; step 2's gradient is inf somewhere: DeepSpeed skips it, so must we."""
    ours_engine = make_engine(1, 1e-3, sync_free_step=True, optimizer=optimizer)
    counts = count_step_work(ours_engine, 3)
    ours = train(ours_engine, 4, poison_step=2)
    theirs = train(make_engine(1, 1e-3, sync_free_step=False, optimizer=optimizer), 4, poison_step=2)
    assert min(n for i, n in enumerate(ours["norms"]) if i != 1) > 1e-3
    assert not math.isfinite(ours["norms"][1])  # logged as inf or nan
    assert ours["adam_steps"] == [3.0, 3.0]  # 4 steps, one skipped
    assert_same_training(ours, theirs)
    # fused AdamW skips on the device; LAMB reads the norm's finiteness back once (DeepSpeed: twice)
    assert counts["reads"] == (0 if optimizer == "adamw" else 1), counts


def test_accumulated_micro_batches_train_as_deepspeeds_without_adding_into_kept_gradients(world_of_one):
    """Before each backward DeepSpeed's own code zeroes the last micro batch's bf16 gradients (its backward
    prologue, which the engine hangs on the loss: ``backward_prologue_hook``) and autograd then adds each new
    one into its zeroed tensor, a kernel a tensor per micro batch; bertpipe's step drops them, so each parameter
    takes its next gradient as it comes. The training is the same (test_zero_stages holds both to a plain
    loop's gradients)."""
    ours, theirs = (make_engine(1, 1.0, sync_free_step=s, accumulation=2) for s in (True, False))
    added = []
    for engine in (ours, theirs):
        backward, calls, counts = engine.engine.backward, [0], {}

        def counted(*args, _backward=backward, _calls=calls, _counts=counts, **kwargs):
            _calls[0] += 1
            if _calls[0] != 2:  # the second micro batch's backward: gradients of the first were kept or not
                return _backward(*args, **kwargs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = _backward(*args, **kwargs)
            _counts["add_"] = sum(1 for e in prof.events() if e.name == "aten::add_")
            return result

        engine.engine.backward = counted
        added.append(counts)
    assert_same_training(train(ours, 3, accumulation=2), train(theirs, 3, accumulation=2))
    tensors = len(list(ours.module.parameters()))
    assert added[0]["add_"] <= added[1]["add_"] - tensors, added
    assert all(p.grad is None for p in ours.module.parameters())  # dropped after the step, as before


def test_the_bf16_gradients_are_added_into_fp32_in_one_add_a_group_to_the_bit(world_of_one):
    """All of a group's gradients present: one cat and one add over the flat fp32 buffer, the same bits as the
    tensor-by-tensor sums; one missing: tensor by tensor, the same again."""
    ds_optimizer = make_engine(1, 1.0, sync_free_step=True).engine.optimizer
    params = [lp for group in ds_optimizer.bf16_groups for lp in group]
    generator = torch.Generator().manual_seed(0)
    for missing in (None, 3):
        ds_optimizer.clear_hp_grads()
        for k, lp in enumerate(params):
            lp.grad = None if k == missing else torch.randn(lp.shape, generator=generator).to(lp.dtype)
        hp_grads = [hp for group in ds_optimizer.fp32_groups_gradients for hp in group]
        for hp in hp_grads:  # something already accumulated, as after an earlier micro batch
            hp.copy_(torch.randn(hp.shape, generator=generator))
        expected = [
            hp + (0 if lp.grad is None else lp.grad.float().view(hp.shape))
            for hp, lp in zip(hp_grads, params, strict=True)
        ]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ds_optimizer.update_hp_grads(clear_lp_grads=True)
        adds = [e.name for e in prof.events() if e.name in ("aten::add_", "aten::_foreach_add_")]
        groups = len(ds_optimizer.bf16_groups)  # 2: with and without weight decay
        if missing is None:  # one add a group, nothing tensor by tensor (the old _foreach_add_: 46 inside it)
            assert adds == ["aten::add_"] * groups, adds
        else:  # the group missing a gradient falls back to the tensor-by-tensor add
            assert adds.count("aten::_foreach_add_") == 1 and len(adds) > groups, adds
        for hp, want in zip(hp_grads, expected, strict=True):
            assert torch.equal(hp, want)
        assert all(lp.grad is None for lp in params)  # dropped once added


def test_it_takes_over_bf16_optimizer_only_and_reads_once_without_fused_adamw(world_of_one):
    assert "not BF16_Optimizer" in sync_free.applies(object(), torch.optim.SGD([torch.ones(1)]))
    unfused = make_engine(1, 1.0, sync_free_step=True, fused=False)  # installs: it reads once, as LAMB
    assert not sync_free.skips_on_device(unfused.base_optimizer)


def test_a_step_never_synchronizes_the_device(world_of_one, monkeypatch):
    """DeepSpeed's throughput timer, on unless configured, synchronizes the device as each forward starts and
    at each optimizer step (after its second step): the host could never queue a step ahead of the GPU.
    bertpipe's filled config turns it off; a config that sets ``timers`` keeps its own."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils.config import DeepSpeedThroughputTimerConfig

    syncs = []
    monkeypatch.setattr(get_accelerator(), "synchronize", lambda *args, **kwargs: syncs.append(1))
    engine = make_engine(1, 1.0, sync_free_step=True)
    for step in range(1, 5):
        engine.step([make_batch(step, 0)]).request()  # and the metrics' read-back only queued, not waited for
    assert syncs == []
    engine.engine.tput_timer.config = DeepSpeedThroughputTimerConfig()  # DeepSpeed's default
    for step in range(5, 9):  # the timer starts timing (and syncing) at its third step
        engine.step([make_batch(step, 0)])
    assert len(syncs) >= 2  # the test sees the timer's syncs

    train = TrainConfig(examples="unused", out="unused", max_steps=10)
    sizes = BatchSizes(global_batch_size=4, micro_batch_size=4, gradient_accumulation_steps=1, world_size=1)
    own = {"timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert fill_deepspeed_config(own, train, sizes, 16)[0]["timers"] == own["timers"]
    assert fill_deepspeed_config({}, train, sizes, 16)[0]["timers"] == {"throughput": {"enabled": False}}


class HostToDevice(TorchDispatchMode):
    """Records the copies of host tensors to another device: (operator, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            to = kwargs.get("device")
            if args[0].device.type == "cpu" and to is not None and torch.device(to).type != "cpu":
                self.copies.append((func.__name__, kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_the_step_metrics_reach_the_device_in_one_non_blocking_copy(monkeypatch):
    """A step's metric sums mix device values with counts known on the host. ``torch.tensor(count,
    device=cuda)`` copies from pageable memory, which waits for everything queued on the device: the
    counts go in one page-locked, non-blocking copy. (The meta device stands in for the GPU here.)"""
    from types import SimpleNamespace

    made_on_device = []
    tensor = torch.tensor

    def recording_tensor(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            made_on_device.append(args)
        return tensor(*args, **kwargs)

    def step_outputs(device):
        scalar = torch.ones((), device=device)
        out = SimpleNamespace(loss=scalar, mlm_loss=scalar, nsp_loss=scalar, mlm_logits=torch.zeros(5, 10, device=device),
                              mlm_labels=torch.zeros(5, dtype=torch.long, device=device),
                              nsp_logits=torch.zeros(4, 2, device=device))  # fmt: skip
        ids = torch.ones(4, 8, dtype=torch.long, device=device)
        return out, {"input_ids": ids, "attention_mask": ids, "next_sentence_label": ids[:, 0]}

    monkeypatch.setattr(torch, "tensor", recording_tensor)
    meta = torch.device("meta")
    with HostToDevice() as mode:
        sums = eng._batch_sums(*step_outputs(meta))
    assert sums.shape == (9,) and sums.device == meta and sums.dtype == torch.float64
    assert made_on_device == [] and mode.copies == [("_to_copy.default", True)]
    cpu_sums = eng._batch_sums(*step_outputs("cpu"))
    assert cpu_sums.tolist() == [1.0, 1.0, 1.0, 5.0, 5.0, 0.0, 4.0, 32.0, 4.0]  # the values as before


# --- two ranks: the partitions and the all-gather -------------------------------------------------------


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    eng.init_distributed()
    verdicts = {}
    for optimizer in ("adamw", "lamb"):
        results = {}
        for name, sync_free_step in (("ours", True), ("theirs", False)):
            engine = make_engine(2, 1e-3, sync_free_step, optimizer=optimizer)
            results[name] = train(engine, 3, rank=rank, poison_step=2)
        try:
            assert_same_training(results["ours"], results["theirs"])
            verdicts[optimizer] = "same"
        except AssertionError as e:
            verdicts[optimizer] = str(e)[:2000]
    partition = results["ours"]["masters"][0].numel()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"verdicts": verdicts, "partition": partition}))
    eng.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_train_as_deepspeeds_step(tmp_path):
    mp.start_processes(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["verdicts"] for r in reports] == [{"adamw": "same", "lamb": "same"}] * 2
    total = BertForPreTraining(BertConfig(**MODEL)).num_parameters()
    assert reports[0]["partition"] < total  # each rank steps its half


def test_the_engine_starts_without_deepspeeds_memory_reports(world_of_one, monkeypatch):
    """BF16_Optimizer's six ``see_memory_usage(force=True)`` while it starts each collect all garbage (0.6 s
    apiece late in a test session) to print figures the engine discards: the engine starts without them, and
    leaves DeepSpeed's function in place after."""
    import deepspeed.runtime.bf16_optimizer as bf16_optimizer

    reports = []
    counting = lambda *args, **kwargs: reports.append(args)  # noqa: E731
    monkeypatch.setattr(bf16_optimizer, "see_memory_usage", counting)
    engine = make_engine(1, 1.0, sync_free_step=True)
    assert type(engine.engine.optimizer).__name__ == "BF16_Optimizer"
    assert reports == [] and bf16_optimizer.see_memory_usage is counting
