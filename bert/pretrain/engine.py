"""The training engine: the only module that imports DeepSpeed.

The loop talks to ``Engine`` only: ``step(micro_batches) -> metrics``, ``evaluate``, ``save`` / ``load``,
``consolidated_state_dict``. The DeepSpeed JSON says "auto" for whatever the training config owns (batch
sizes, clipping, precision when the config names one, optimizer/scheduler params); ``bert.pretrain.ds_config.fill_deepspeed_config``
fills those and refuses, listing every one, values that disagree with the training config. The optimizer
and the LR schedule are always bertpipe's (``bert.optim``), so CPU and GPU runs do the same math: an
"optimizer"/"scheduler" section in the JSON is checked against the training config, then dropped.

"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed picks an accelerator

# DeepSpeed's autotuner imports MLflow when it is installed (bertpipe's registry needs it): 1.5-5 s of every
# rank's start-up for a tuner bertpipe never runs. Hidden only while DeepSpeed is imported, so a process that
# uses MLflow itself (the tests, a notebook) still can.
_hide_mlflow = "mlflow" not in sys.modules
if _hide_mlflow:
    sys.modules["mlflow"] = None  # import mlflow raises ImportError: the autotuner then goes without
try:
    import deepspeed  # noqa: E402
finally:
    if _hide_mlflow:
        del sys.modules["mlflow"]
import torch.distributed as dist  # noqa: E402

from bert.model.encoder import has_fill, packing_inputs  # noqa: E402
from bert.model.heads import IGNORE_INDEX, find_mlm_positions  # noqa: E402
from bert.optim import Lamb, PartitionLayout  # noqa: E402
from bert.pretrain import sync_free  # noqa: E402
from bert.pretrain.config import cuda_graphs, derive_seed, inductor_options  # noqa: E402
from bert.pretrain.ds_config import remove_shm_buffers  # noqa: E402
from bert.pretrain.run import LATEST, newest_checkpoint  # noqa: E402

log = logging.getLogger(__name__)


# --- the process group ----------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a single process without the launcher becomes a world of one."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # each rank its own GPU, before NCCL binds to one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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
    if dist.get_backend() == "nccl":  # name the rank's GPU: NCCL would otherwise guess (and warn)
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_stop(code: int) -> int:
    """The largest stop code over all ranks (0: go on), so every rank stops at the same step."""
    t = torch.tensor([code], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def shutdown() -> None:
    """Destroy the process group (every exit path of a rank calls this; a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a broken group (a peer died) must not hide the real error
            dist.destroy_process_group()
    if os.environ.get("MASTER_PORT"):
        remove_shm_buffers(os.environ["MASTER_PORT"], os.environ.get("RANK", "0"))


def broadcast_object(obj):
    """rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- the engine -----------------------------------------------------------------------------------------


@dataclass
class StepMetrics:
    """A step's metrics as the step left them, on the device: ``request()`` sums them over the ranks and starts
    reading them back without waiting, ``fetch()`` waits for them. Every rank must request the same steps
    (it is an all-reduce)."""

    totals: torch.Tensor  # this rank's sums (``_batch_sums``)
    num_micro: int  # micro batches over all ranks
    grad_norm: torch.Tensor | float | None
    lr: float

    def request(self) -> MetricsRequest:
        """Queue the all-reduce and the copy to host memory behind the step; the host does not wait here.

        The training loop requests a logged step's metrics and reads them (``MetricsRequest.result()``) once
        it has queued the next step, so the GPU has work while the host waits and writes the record.
        """
        values = self.totals.to(comm_device())
        dist.all_reduce(values)
        norm = float("nan") if self.grad_norm is None else self.grad_norm
        if torch.is_tensor(norm):  # already global: not summed over the ranks
            norm_on_device = norm.detach().to(values.device, torch.float64).reshape(1)
            values, norm = torch.cat([values, norm_on_device]), None
        ready = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return MetricsRequest(values, ready, norm, self.num_micro, self.lr)

    def fetch(self) -> dict[str, float]:
        """Losses and accuracies averaged over all ranks, the gradient norm and the learning rate (waits)."""
        return self.request().result()


@dataclass
class MetricsRequest:
    """A step's metrics on their way to the host (``StepMetrics.request``)."""

    values: torch.Tensor  # the summed totals (and a tensor norm); on the host once ``ready`` has passed
    ready: torch.cuda.Event | None  # None: already there (a CPU run)
    grad_norm: float | None  # the norm, where the engine gave it as a number (None: the last of ``values``)
    num_micro: int
    lr: float

    def result(self) -> dict[str, float]:
        """Losses and accuracies averaged over all ranks, the gradient norm and the learning rate."""
        if self.ready is not None:
            self.ready.synchronize()  # the step and the copy are done: waits for nothing queued after them
        metrics = _metrics_from_sums(self.values[:9], num_micro=self.num_micro)
        metrics["grad_norm"] = float(self.values[9]) if self.grad_norm is None else self.grad_norm
        metrics["lr"] = self.lr
        return metrics


# The sizes that change from batch to batch: the padded length (dim 1 of the (B, T) inputs), the packed
# tokens (N) and the predicted positions (M).
DYNAMIC_DIMS = {"input_ids": 1, "attention_mask": 1, "token_type_ids": 1, "labels": 1, "unpad_indices": 0,
                "mlm_positions": 0}  # fmt: skip


def mark_dynamic_sizes(batch: dict) -> None:
    """Tell torch.compile which of ``batch``'s sizes vary, before its first graph.

    Otherwise Dynamo compiles the first step for its exact sizes and, at the second step's other sizes,
    compiles the whole model again with them symbolic: one wasted compilation per run (29 s for BERT-base,
    54 s for BERT-large on an H200, measured 2026-12-04).
    """
    for name, dim in DYNAMIC_DIMS.items():
        value = batch.get(name)
        if torch.is_tensor(value) and value.dim() > dim:
            torch._dynamo.maybe_mark_dynamic(value, dim)
    if "input_ids" in batch and has_fill(batch.get("cu_seqlens"), len(batch["input_ids"])):
        # packed to a multiple, the number of fill sequences depends on T (``fill_sequences``)
        torch._dynamo.maybe_mark_dynamic(batch["cu_seqlens"], 0)


def slow_optimizer_warning(optimizer: str, device: str) -> str | None:
    """The warning for a DeepSpeed optimizer wrapper known to stall a GPU every step, else None."""
    if optimizer == "FP16_UnfusedOptimizer" and device.startswith("cuda"):
        return (
            "ZeRO-0 with bf16/fp16 runs DeepSpeed's unfused 16-bit optimizer, which waits for the GPU once per "
            "parameter tensor every step (its overflow test); deepspeed_configs/zero1_bf16.json (or zero1_fp16.json) "
            "runs without those waits, and ZeRO-1 partitions nothing on one GPU"
        )
    return None


def partition_layouts(
    ds_optimizer, base_optimizer: torch.optim.Optimizer, model: torch.nn.Module
) -> dict[int, PartitionLayout]:
    """Where each model tensor lies in the flat fp32 partitions a ZeRO-1/2 optimizer steps (by the partition's
    id): DeepSpeed's fragment address of every tensor of each group (``_hp_mapping``, kept by its
    BF16_Optimizer and its ZeRO optimizer alike for universal checkpoints)."""
    lp_groups = getattr(ds_optimizer, "bf16_groups", None) or getattr(ds_optimizer, "bit16_groups", None)
    partitions = getattr(ds_optimizer, "fp32_groups_flat_partition", None) or getattr(
        ds_optimizer, "single_partition_of_fp32_groups", None
    )
    if lp_groups is None or partitions is None:
        raise ValueError(f"cannot find the partitions of DeepSpeed's {type(ds_optimizer).__name__}")
    base = [p for group in base_optimizer.param_groups for p in group["params"]]
    if {id(p) for p in partitions} != {id(p) for p in base}:
        raise ValueError("the optimizer does not step DeepSpeed's fp32 partitions: no layer-wise LAMB")
    number = {id(p): i for i, p in enumerate(model.parameters())}
    layouts = {}
    for i, (lps, partition) in enumerate(zip(lp_groups, partitions, strict=True)):
        fragments = sorted(
            (
                lp._hp_mapping.hp_fragment_address.start,
                lp._hp_mapping.hp_fragment_address.numel,
                number[id(lp)],
            )
            for lp in lps
            if getattr(lp, "_hp_mapping", None) is not None
        )
        group = ds_optimizer.real_dp_process_group[i]
        spread = dist.get_world_size(group=group) > 1
        layouts[id(partition)] = PartitionLayout(fragments, len(number), group if spread else None)
    return layouts


def resolve_compile(compile: bool | None) -> bool:
    """Whether to torch.compile: as asked, or (None) when CUDA is there; the CPU compiles for longer than it gains."""
    return torch.cuda.is_available() if compile is None else bool(compile)


@contextlib.contextmanager
def _no_bf16_memory_reports():
    """Without BF16_Optimizer's memory reports while it starts: six ``see_memory_usage(force=True)``, each a full
    garbage collection before it prints what the engine discards anyway (0.6 s a collection in a process holding
    ~0.9 M objects, as a long test session or an inductor-compiled model does)."""
    module = sys.modules.get("deepspeed.runtime.bf16_optimizer")
    original = getattr(module, "see_memory_usage", None)
    if original is None:
        yield
        return
    module.see_memory_usage = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module.see_memory_usage = original


@contextlib.contextmanager
def _no_warm_up_step(optimizer: torch.optim.Optimizer):
    """Around ``deepspeed.initialize``: whatever optimizer step DeepSpeed takes on zero gradients to create the
    optimizer's state leaves no trace. ZeRO-0 bf16's FP16_UnfusedOptimizer takes one: AdamW then counted it as its
    first step (its bias corrections one step ahead: the first real update 0.74 of AdamW's, measured 2026-12-04)
    and applied weight decay to the fresh weights. At learning rate 0 that step changes no weight (decay
    ``p * (1 - 0 * wd)``, update ``0 * m / d``: exact), the moments it leaves are zeros, and the step counts go
    back to 0. The engine sets every step's learning rate itself."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        yield
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        for state in optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                state["step"] = 0


def backward_prologue_hook(ds_engine) -> Callable[[torch.Tensor], object] | None:
    """What hangs DeepSpeed's backward prologue on a loss, as ``engine.forward`` hangs it on the outputs it
    recognises (tensors, tuples, lists, dicts: not bertpipe's dataclass); None where this DeepSpeed has none.

    The prologue tells the ZeRO optimizers before the backward whether this micro batch ends the step (ZeRO-2
    reduces during the backward only then), lets ZeRO-3 swap optimizer state in, and has BF16_Optimizer clear
    the last micro batch's bf16 gradients: without it, under gradient accumulation, autograd added each micro
    batch's gradients into the previous ones and BF16_Optimizer's fp32 sum counted micro batch i of k
    (k - i + 1) times (k: the base-phase1/phase2 recipes' 4 and 8).
    """
    try:
        from deepspeed.runtime.utils import register_output_backward_hooks
    except ImportError:  # a DeepSpeed without output hooks: its backward is its own business
        return None
    if not hasattr(ds_engine, "_backward_prologue"):
        return None
    per_tensor = getattr(ds_engine, "_backward_prologue_per_tensor", None)
    return functools.partial(register_output_backward_hooks, preprocess_per_tensor_fn=per_tensor,
                             preprocess_once_fn=lambda: ds_engine._backward_prologue())  # fmt: skip


def host_inputs(batch: dict[str, torch.Tensor], multiple_of: int = 0) -> dict[str, torch.Tensor]:
    """A copy of the collated (CPU) ``batch`` with its packing (``packing_inputs``) and MLM positions added.

    Computed on the host, where the model would otherwise find them on the device (``nonzero``/``tolist``:
    a sync per step and a graph break under torch.compile). The training loop calls it on the prefetch thread,
    so the step does not spend its time on it; what is already there, or on the device, is kept.
    ``multiple_of`` (``TrainConfig.pack_multiple_of``) rounds the packed tokens and the predicted positions up
    to a multiple of it with fill rows the model ignores, both or neither.
    """
    batch = dict(batch)
    if "attention_mask" in batch and "unpad_indices" not in batch and not batch["attention_mask"].is_cuda:
        batch.update(packing_inputs(batch["attention_mask"], multiple_of))
    if batch.get("labels") is not None and "mlm_positions" not in batch and not batch["labels"].is_cuda:
        batch["mlm_positions"] = find_mlm_positions(batch["labels"], multiple_of)
    return batch


class Engine:
    """A DeepSpeed engine around a BertForPreTraining, with bertpipe's optimizer and LR schedule.

    ``compile`` (``TrainConfig.compile``; None: on CUDA only): DeepSpeed's ``engine.compile()``, after
    ``deepspeed.initialize``. It compiles the module in place (``nn.Module.compile``): parameter names,
    checkpoints and exports stay those of the eager model (``torch.compile(model)`` before initialize
    would hand DeepSpeed an ``OptimizedModule`` whose names all start with ``_orig_mod.``), and DeepSpeed
    keeps the optimizer, ZeRO's partitioning and its hooks, which it keeps out of the graph itself.
    ``compile_options`` (``TrainConfig.compile_options``): Inductor settings, torch.compile's ``options``.
    """

    compile_backend: str | None = None  # None: the accelerator's (inductor); tests use a cheaper one

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ds_config: dict,
        lr_at: Callable[[int], float],
        seed: int,
        compile: bool | None = None,
        compile_options: dict | None = None,
        pack_multiple_of: int = 0,
    ):
        self.base_optimizer = optimizer
        self.pack_multiple_of = pack_multiple_of
        self.lr_at = lr_at
        self.seed = seed
        model.bert.check_values = False  # the collator checks the ids on the host (no device read per step)
        # BF16_Optimizer prints 18 lines of memory figures while it starts (see_memory_usage(force=True));
        # DeepSpeed's warnings go through its logger, which this leaves alone. Shown only if it fails.
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), _no_bf16_memory_reports(), _no_warm_up_step(optimizer):
                self.engine, _, _, _ = deepspeed.initialize(
                    model=model, optimizer=optimizer, config=ds_config
                )
        except BaseException:
            sys.stderr.write(printed.getvalue())
            raise
        self.compiled = resolve_compile(compile)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.compiled:
            backend = {"backend": self.compile_backend} if self.compile_backend else {}
            config = model.config
            dropout = bool(config.hidden_dropout_prob or config.attention_probs_dropout_prob)
            device_type = torch.device(self.engine.device).type
            compile_options, note = inductor_options(compile_options, dropout, device_type)
            if note and self.rank == 0:
                log.info(note)
            options = {"compile_kwargs": {"options": compile_options}} if compile_options else {}
            self.engine.compile(**backend, **options)
        self.cuda_graphs = self.compiled and cuda_graphs(compile_options or {})
        self.zero_stage = self.engine.zero_optimization_stage()
        self.precision = (
            "bf16" if self.engine.bfloat16_enabled() else "fp16" if self.engine.fp16_enabled() else "fp32"
        )
        self.device = self.engine.device
        self._lay_out_lamb()
        # BF16_Optimizer: its step with one read of the device (LAMB) or none (fused AdamW): bert.pretrain.sync_free
        self.sync_free_step = sync_free.install(self.engine.optimizer, optimizer)
        self._hang_backward_prologue = backward_prologue_hook(self.engine)
        warning = slow_optimizer_warning(type(self.engine.optimizer).__name__, str(self.device))
        if isinstance(optimizer, Lamb) and self.zero_stage == 3 and self.world_size > 1:
            warning = (
                "LAMB under ZeRO-3 computes its trust ratio per partition of each tensor, not per layer "
                "(not the paper's LAMB); ZeRO-1 or 2 keep it layer-wise on any number of ranks"
            )
        if warning and self.rank == 0:
            log.warning(warning)

    def _lay_out_lamb(self) -> None:
        """LAMB under ZeRO-1/2: where each layer lies in the partitions it steps (layer-wise trust ratios)."""
        if isinstance(self.base_optimizer, Lamb) and self.zero_stage in (1, 2):
            layouts = partition_layouts(self.engine.optimizer, self.base_optimizer, self.engine.module)
            self.base_optimizer.set_partition_layouts(layouts)

    def cuda_graph_warning(self) -> str | None:
        """Once the first steps have compiled: a warning if CUDA graphs were asked for and Inductor ran some
        compiled graph without them (its reasons are logged only under ``TORCH_LOGS=cudagraphs``), else None."""
        if not self.cuda_graphs:
            return None
        from torch._dynamo.utils import counters

        skipped = counters["inductor"]["cudagraph_skips"]
        if not skipped:
            return None
        where = (
            "the CPU has none" if str(self.device).startswith("cpu") else "TORCH_LOGS=cudagraphs shows why"
        )
        return (
            f"compile_options asked for CUDA graphs, but Inductor ran {skipped} compiled graph(s) without them "
            f"({where})"
        )

    @property
    def global_step(self) -> int:
        """Optimizer steps taken since the start of training (restored by ``load``)."""
        return self.engine.global_steps

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on the device, with its packing and MLM positions computed first, on the host
        (``host_inputs``; the training loop's prefetch thread has usually added them already)."""
        batch = host_inputs(batch, self.pack_multiple_of)
        batch = {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }
        if self.compiled:
            mark_dynamic_sizes(batch)
            batch.pop("max_seqlen", None)  # the model bounds it by the padded length (see BertModel.packing)
        return batch

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepMetrics:
        """One optimizer step over this rank's micro batches; its metrics, still on the device (``fetch()``)."""
        step = self.global_step
        lr = self.lr_at(step)
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        # Dropout is seeded by (seed, step, rank), so a resumed run draws the same masks.
        torch.manual_seed(derive_seed(self.seed, step, self.rank))
        if not (self.engine.training and self.engine.module.training):  # train() walks every submodule: ~1 ms
            self.engine.train()
        totals = torch.zeros(9, dtype=torch.float64, device=self.device)  # summed on the device: no syncs
        own_grad_norm = None
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            out = self.engine(**batch)
            if self._hang_backward_prologue is not None:
                self._hang_backward_prologue(out.loss)
            self.engine.backward(out.loss)
            if i == len(micro_batches) - 1 and self.zero_stage == 0 and self.precision == "fp32":
                own_grad_norm = _grad_norm(self.engine.module)  # DeepSpeed does not report it here
            self.engine.step()
            totals += _batch_sums(out, batch)
        assert self.global_step == step + 1, "DeepSpeed did not step at the accumulation boundary"
        norm = self.engine.get_global_grad_norm() if own_grad_norm is None else own_grad_norm
        return StepMetrics(totals, len(micro_batches) * self.world_size, norm, lr)

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Losses and accuracies over this rank's evaluation batches, averaged over all ranks."""
        self.engine.eval()
        totals = torch.zeros(10, dtype=torch.float64, device=self.device)
        for batch in batches:
            batch = self._to_device(batch)
            totals[:9] += _batch_sums(self.engine(**batch), batch)
        totals[9] = len(batches)  # the number of batches over all ranks, summed with the rest
        totals = totals.to(comm_device())
        dist.all_reduce(totals)
        totals = totals.cpu()
        return _metrics_from_sums(totals[:9], num_micro=max(1, int(totals[9].item())))

    def save(self, checkpoint_dir: str | os.PathLike, tag: str, client_state: dict) -> None:
        """DeepSpeed's checkpoint of model, optimizer and engine state, on every rank.

        DeepSpeed does not touch ``latest``: it would rewrite it in place before the checkpoint is complete;
        ``bert.pretrain.checkpoint.save_checkpoint`` points it at the tag once it is. A 16-bit ZeRO-0 run also records which parameter each fp32 master copy is (``MASTER_NAMES``), so
        ``checkpoint_state_dict`` can export those rather than the 16-bit working weights.
        """
        names = _master_param_names(self.engine)
        if names is not None:
            client_state = {**client_state, MASTER_NAMES: names}
        self.engine.save_checkpoint(
            str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False
        )

    def load(
        self, checkpoint_dir: str | os.PathLike, tag: str | None = None, universal: bool = False
    ) -> dict:
        """Restore a checkpoint (the newest complete one when no tag); returns its client_state.

        ``universal``: ``tag`` is a universal checkpoint (``universal_checkpoint``), loadable on any world size.
        """
        config = self.engine._config  # DeepSpeed reads this flag only while loading
        before = config.load_universal_checkpoint
        # ZeRO-3's universal load (DeepSpeed 0.19) gives every parameter group the first group's
        # hyperparameters (weight decay on biases and LayerNorm too), and one shared ``step`` tensor that
        # Adam then advances once per group. The hyperparameters are the training config's: keep this run's.
        hyperparameters = [
            {k: v for k, v in group.items() if k != "params"} for group in self.base_optimizer.param_groups
        ]
        if tag is None:
            tag = newest_checkpoint(Path(checkpoint_dir))[0]
            if tag is None:
                raise ValueError(f"{checkpoint_dir} holds no complete checkpoint")
        config.load_universal_checkpoint = universal
        try:
            path, client_state = self.engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        finally:
            config.load_universal_checkpoint = before
        if universal:
            for group, values in zip(self.base_optimizer.param_groups, hyperparameters, strict=True):
                group.update(values)
            for state in self.base_optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if path is None:
            raise ValueError(f"no loadable checkpoint in {checkpoint_dir}")
        self._lay_out_lamb()  # a load may relink (or replace) DeepSpeed's partitions
        return client_state or {}

    def consolidated_state_dict(self, checkpoint_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
        """The fp32 master weights of a saved checkpoint (ZeRO partitions merged); call on one rank."""
        return checkpoint_state_dict(checkpoint_dir, tag)


def checkpoint_state_dict(
    checkpoint_dir: str | os.PathLike, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint (when no tag, the newest complete one, else the one DeepSpeed's
    ``latest`` names): the optimizer's fp32 master copy.

    ZeRO-1/2/3: the master partitions merged (deepspeed.utils.zero_to_fp32; BF16_Optimizer's by their slice
    mappings). ZeRO-0 bf16/fp16: the 16-bit optimizer's fp32 groups, named by ``Engine.save``. ZeRO-0 fp32
    (or a 16-bit checkpoint without those names): the module's weights.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        tag = newest_checkpoint(checkpoint_dir)[0]
    if tag is None:  # no bertpipe state files: a plain DeepSpeed checkpoint directory
        latest = checkpoint_dir / LATEST
        tag = latest.read_text().strip() if latest.is_file() else ""
        if not tag:
            raise ValueError(
                f"{checkpoint_dir} holds no complete checkpoint: it is not a (finished) checkpoint directory"
            )
    directory = checkpoint_dir / tag
    # ZeRO-0/1/2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_<N>_mp_rank_00_model_states.pt per rank.
    files = sorted(directory.glob("*mp_rank_*_model_states.pt"), key=lambda p: (len(p.name), p.name))
    if not files:
        raise ValueError(f"{directory} holds no model states: not a DeepSpeed checkpoint")
    model_states = torch.load(files[0], map_location="cpu", weights_only=False)
    optim_files = sorted(directory.glob("*_optim_states.pt"), key=_rank_of_file)
    if optim_files:  # partitioned by a ZeRO optimizer (or BF16_Optimizer)
        first = torch.load(optim_files[0], map_location="cpu", mmap=True, weights_only=False)
        first = first["optimizer_state_dict"]
        if "zero_stage" in first:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of the merge
                state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
        else:
            state = _merge_slice_mappings(optim_files, model_states)
    else:
        state = _named_master_weights(model_states)
    return {k: v.detach().float() for k, v in state.items()}


def _grad_norm(module: torch.nn.Module) -> torch.Tensor | float:
    """The gradients' global L2 norm, left on the device (read back with the step's other metrics)."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return (
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0.0
    )


def _batch_sums(out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[loss, mlm_loss, nsp_loss, mlm_correct, mlm_count, nsp_correct, nsp_count, tokens, samples], float64
    on the model's device, computed without waiting for it.

    The values known on the host (the counts) travel in one copy from page-locked memory, queued behind the
    step: ``torch.tensor(value, device=cuda)`` would copy from pageable memory, which waits for the device to
    finish everything queued before (on an H200, 7.5 ms of every BERT-base step idle, measured 2026-12-04).
    """
    device = out.loss.device
    mlm_correct = mlm_count = 0
    if out.mlm_labels is not None:
        mlm_correct = (out.mlm_logits.argmax(-1) == out.mlm_labels).sum()
        # the fill positions of a packing to a multiple (label -100) are not predictions
        filled = has_fill(batch.get("cu_seqlens"), len(batch["input_ids"]))
        mlm_count = (out.mlm_labels != IGNORE_INDEX).sum() if filled else len(out.mlm_labels)
    nsp_correct = (out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum()
    values = [
        out.loss,
        out.mlm_loss,
        out.nsp_loss,
        mlm_correct,
        mlm_count,
        nsp_correct,
        len(batch["next_sentence_label"]),
        batch["attention_mask"].sum(),
        len(batch["input_ids"]),
    ]
    zero = torch.zeros((), dtype=torch.float64, device=device)
    on_device = torch.stack(
        [v.detach().to(device, torch.float64) if torch.is_tensor(v) else zero for v in values]
    )
    on_host = torch.tensor([0.0 if torch.is_tensor(v) else float(v) for v in values], dtype=torch.float64)
    if device.type == "cuda":
        on_host = on_host.pin_memory()
    return on_device + on_host.to(device, non_blocking=True)


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


# --- checkpoint helpers ---------------------------------------------------------------------------------

MASTER_NAMES = "bertpipe_master_param_names"  # client_state: names of a 16-bit ZeRO-0 optimizer's groups
UNIVERSAL = "universal"  # checkpoints/<tag>/universal: the tag converted by ``universal_checkpoint``
UNIVERSAL_DONE = "bertpipe_converted"  # written last: a conversion that was cut short is redone


def _master_param_names(engine) -> list[list[str]] | None:
    """Names of the parameters in each fp32 group of a 16-bit ZeRO-0 optimizer (None for other optimizers).

    DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer (fp16, and bf16 without ZeRO) keep fp32 master
    copies in ``fp32_groups`` (or ``fp32_groups_flat``) in the order of their ``fp16_groups``.
    """
    groups = getattr(engine.optimizer, "fp16_groups", None)
    if engine.zero_optimization() or groups is None:
        return None
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group] for group in groups]


def _named_master_weights(model_states: dict) -> dict[str, torch.Tensor]:
    """A ZeRO-0 checkpoint's weights: the fp32 master copies when ``Engine.save`` named them, else the module's."""
    module = model_states["module"]
    names, optimizer = model_states.get(MASTER_NAMES), model_states.get("optimizer") or {}
    groups = optimizer.get("fp32_groups") or optimizer.get("fp32_groups_flat")
    if names is None or groups is None:
        return module
    masters: dict[str, torch.Tensor] = {}
    for group_names, group in zip(names, groups, strict=True):
        if torch.is_tensor(group):  # FP16_Optimizer: one flat fp32 tensor per group
            sizes = [module[name].numel() for name in group_names]
            group = group[: sum(sizes)].split(sizes)
        masters.update(
            (name, master.view(module[name].shape)) for name, master in zip(group_names, group, strict=True)
        )
    # A tied weight is saved under each of its names, sharing one storage: every name gets the master.
    owner = {module[name].data_ptr(): name for name in masters}
    return {
        key: masters.get(key, masters[owner[value.data_ptr()]] if value.data_ptr() in owner else value)
        for key, value in module.items()
    }


def _rank_of_file(path: Path) -> int:
    """The data-parallel rank in a DeepSpeed optimizer file name (``..._pp_rank_<N>_mp_rank_...``)."""
    match = re.search(r"pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


def _merge_slice_mappings(optim_files: list[Path], model_states: dict) -> dict[str, torch.Tensor]:
    """Full fp32 weights from BF16_Optimizer's partitions (ZeRO-1 with fp32 gradient accumulation).

    Each rank's ``param_slice_mappings`` say where each parameter's fragment lies in its fp32 partition;
    the fragments of a parameter, in rank order, are its flat values.
    """
    fragments: dict[str, list[torch.Tensor]] = {}
    for path in optim_files:
        sd = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for partition, mapping in zip(
            sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"], strict=True
        ):
            for name, address in mapping.items():
                fragments.setdefault(name, []).append(partition.narrow(0, address.start, address.numel))
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    state = {name: torch.cat(fragments[name]).view(shape) for name, shape in shapes.items()}
    for alias, source in (model_states.get("shared_params") or {}).items():
        state[alias] = state[source]
    buffers = model_states.get("buffer_names") or []
    return {**{name: model_states["module"][name] for name in buffers}, **state}


def universal_checkpoint(checkpoint_dir: str | os.PathLike, tag: str) -> str:
    """Convert ZeRO checkpoint ``tag`` to DeepSpeed's universal format, once; the tag to ``load(universal=True)``.

    Call on one rank (the others wait at a barrier). The result sits inside the checkpoint, so it is
    deleted with it.
    """
    source = Path(checkpoint_dir) / tag
    target = source / UNIVERSAL
    if not (target / UNIVERSAL_DONE).exists():
        import argparse
        import shutil

        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        shutil.rmtree(target, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
            to_universal(args)
        (target / UNIVERSAL_DONE).write_text(tag + "\n")
    return f"{tag}/{UNIVERSAL}"
