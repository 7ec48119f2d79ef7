"""MLM + NSP pretraining on every rank: ``setup`` (config, process group) → ``main`` (model, data) → ``fit``.

Run it as ``deepspeed --module bert.pretrain --config FILE`` (every rank), as ``python -m bert.pretrain
--config FILE`` (one process: still DeepSpeed, a world of one over gloo), or call ``main(TrainConfig(...))``.
``bert.pretrain.launch`` (behind ``bertpipe pretrain`` and the Prefect task) runs the deepspeed launcher for you.

OUT/ holds: train_config.json, deepspeed_config.json (resolved), checkpoints/<step-N>/ (DeepSpeed's, plus
bertpipe_state.json, written last) and checkpoints/latest (the newest complete one's tag), hf/
(transformers-loadable model + tokenizer), metrics.jsonl, tensorboard/, data_log/rank<R>.jsonl (on request),
logs/error-rank<R>.txt (when a rank fails), result.json.

"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

import numpy as np
import psutil
import torch

from bert.model import BertForPreTraining
from bert.optim import build_optimizer, lr_multiplier
from bert.pretrain import engine as eng
from bert.pretrain.checkpoint import export_hf, resume, save_checkpoint
from bert.pretrain.config import TrainConfig, parse_profile_steps
from bert.pretrain.data import DataPosition, Prefetcher, RankBatches
from bert.pretrain.ds_config import fill_deepspeed_config, load_deepspeed_config
from bert.pretrain.profile import StepProfiler
from bert.pretrain.run import (
    PARENT_HOST_ENV,
    PARENT_PID_ENV,
    PretrainResult,
    Run,
    load_run_inputs,
    refuse_existing_checkpoints,
    resolve_init,
)
from data_prep.manifest import DISK_FULL_ERRNOS, LOW_FREE_BYTES, error_chain, format_bytes, free_bytes

log = logging.getLogger("bert.pretrain")


# --- the loop -------------------------------------------------------------------------------------------


class StopSignal:
    """Remembers a SIGTERM, or that the launching process died; the loop checks it between steps.

    ``bert.pretrain.launch`` puts its pid in BERTPIPE_PARENT_PID: when that process is gone (killed with SIGKILL, say)
    the ranks stop as on SIGTERM, agreeing on a step and checkpointing, instead of training on unattended.
    A pid names a process on one host only: a rank on another host (BERTPIPE_PARENT_HOST differs) ignores it.
    The ssh launcher passes neither variable to remote nodes, so their ranks have no such watch.
    """

    def __init__(self):
        import socket

        self._received = False
        self._previous = None
        self._parent_pid = int(os.environ.get(PARENT_PID_ENV) or 0) or None
        host = socket.gethostname()
        if os.environ.get(PARENT_HOST_ENV, host) != host:
            self._parent_pid = None  # another host's pid: this host's process with that number is not it
        self._parent = None  # a psutil.Process, so that a reused pid is not mistaken for the launcher
        if self._parent_pid is not None:
            with contextlib.suppress(psutil.Error):
                self._parent = psutil.Process(self._parent_pid)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self._received = True

    @property
    def received(self) -> bool:
        if not self._received and self._parent_gone():
            log.warning("the launching process %d is gone: stopping as on SIGTERM", self._parent_pid)
            self._received = True
        return self._received

    def _parent_gone(self) -> bool:
        if self._parent_pid is None:
            return False
        if self._parent is None:  # already gone when the loop started
            return True
        try:  # a zombie (dead, not yet reaped by its own parent) is gone too
            return not self._parent.is_running() or self._parent.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluation_batches(run: Run) -> list[dict]:
    """This rank's share of the first ``eval_samples`` valid examples (masking seeded as in epoch 0)."""
    n = min(run.config.eval_samples, len(run.valid)) // run.world_size * run.world_size
    mine = np.arange(n)[run.rank :: run.world_size]
    size = run.batch.micro_batch_size
    return [run.collator(run.valid, mine[i : i + size], epoch=0) for i in range(0, len(mine), size)]


class MetricsLog:
    """metrics.jsonl + TensorBoard + a progress bar, on rank 0 only."""

    def __init__(self, run: Run, start_step: int):
        self.active = run.rank == 0
        self.path = run.out / "metrics.jsonl"
        self.writer = self.bar = None
        if not self.active:
            return
        if self.path.exists():  # a resumed run: drop records past the checkpoint it continues from
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        if run.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=start_step + 1)
        if run.config.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=run.config.max_steps, initial=start_step, desc="pretrain", unit="step",
                            dynamic_ncols=True, mininterval=1.0, file=sys.stderr)  # fmt: skip

    def write(self, record: dict, prefix: str = "train") -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self.bar is not None and prefix == "train":
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def open_data_log(out: Path, rank: int) -> TextIO:
    """Open ``out/data_log/rank<R>.jsonl`` for appending, line-buffered so a killed run keeps every line."""
    (out / "data_log").mkdir(parents=True, exist_ok=True)
    return open(out / "data_log" / f"rank{rank}.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115


STOP_CHECK_EVERY = 4  # steps between the ranks' stop agreements (an all-reduce the host must wait for)
PREFETCH_DEPTH = 4  # global batches collated ahead of the step, on a background thread


def train_record(step: int, epoch: int, metrics: dict, times: list[float], world_size: int) -> dict:
    """A metrics.jsonl record: the step's metrics, and per step of those since the last record
    (``times``: steps, their seconds, their seconds waiting for data) the time, the wait and throughput."""
    steps, step_s, wait_s = times
    mean_s = step_s / steps
    peak = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a host-side counter: no device sync
        peak = {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {
        "step": step,
        "epoch": epoch,
        **metrics,
        "step_time_s": mean_s,
        "data_wait_s": wait_s / steps,
        "data_wait_share": wait_s / step_s if step_s > 0 else 0.0,
        "tokens_per_s": metrics["tokens"] / mean_s,
        "tokens_per_s_per_rank": metrics["tokens"] / mean_s / world_size,
        "samples_per_s": metrics["samples"] / mean_s,
        **peak,
    }


def fit(run: Run) -> PretrainResult:
    """Train until max_steps, the time budget or SIGTERM; checkpoint, evaluate and export on the way.

    The batches are collated ahead on a background thread (``Prefetcher``), with their packing and MLM
    positions (``host_inputs``); a logged step's metrics are requested from the device as it is queued and
    read once the next step is queued (its record is written one step late, while the GPU runs that step),
    and the ranks agree on stopping every ``STOP_CHECK_EVERY`` steps (every step in a world of one, which
    needs no agreement): no step waits for the device to drain.
    """
    config, engine = run.config, run.engine
    metrics_log = MetricsLog(run, engine.global_step)
    data_log = open_data_log(run.out, run.rank) if config.log_example_indices else None
    budget = config.time_budget_seconds
    check_every = 1 if run.world_size == 1 else STOP_CHECK_EVERY
    started = time.monotonic()
    record, eval_metrics, checkpoint, hf_dir = {}, None, None, None
    saved_step = exported_step = None
    pending = None  # (step, epoch, metrics, times) of the last step when it was not logged
    requested = None  # (step, epoch, MetricsRequest, times) of a logged step whose record is not written yet
    window = [0, 0.0, 0.0]  # since the last record: steps, their seconds, their seconds waiting for data
    since_check, steps_run = [0, 0.0], 0  # since the last stop agreement: steps, their seconds

    def collate(indices, epoch):  # on the prefetch thread
        return eng.host_inputs(run.collator(run.train, indices, epoch), config.pack_multiple_of)

    def write_requested() -> None:
        nonlocal requested, record
        if requested is not None:
            step, epoch, request, times = requested
            record = train_record(step, epoch, request.result(), times, run.world_size)
            metrics_log.write(record)
            requested = None

    profiler = StepProfiler(parse_profile_steps(config.profile_steps), run.out, run.rank, engine)
    with StopSignal() as stop:
        with Prefetcher(run.batches, collate, PREFETCH_DEPTH) as prefetcher:
            while True:
                if config.max_steps is not None and engine.global_step >= config.max_steps:
                    stop_reason = "max_steps"
                    break
                if steps_run % check_every == 0:
                    # the next agreement comes check_every steps on: stop now if those would overrun the budget
                    mean_step_s = since_check[1] / since_check[0] if since_check[0] else 0.0
                    elapsed = time.monotonic() - started
                    out_of_time = budget is not None and elapsed + check_every * mean_step_s >= budget
                    code = 2 if stop.received else 1 if out_of_time else 0
                    code = eng.agree_stop(code) if run.world_size > 1 else code
                    since_check = [0, 0.0]
                    if code:
                        stop_reason = "sigterm" if code == 2 else "time_budget"
                        break
                t0 = time.perf_counter()
                batch = prefetcher.next()
                wait_s = time.perf_counter() - t0
                profiler.before(engine.global_step + 1)
                metrics = engine.step(batch.micro_batches)
                step, steps_run = engine.global_step, steps_run + 1
                profiler.after(step)
                # both graphs (forward, backward) exist after a step, and are recorded by the second
                if steps_run == 2 and (warning := engine.cuda_graph_warning()) and run.rank == 0:
                    log.warning(warning)
                write_requested()  # the previous logged step's: it waits for that step, not for this one
                step_s = time.perf_counter() - t0
                window = [window[0] + 1, window[1] + step_s, window[2] + wait_s]
                since_check = [since_check[0] + 1, since_check[1] + step_s]
                if data_log is not None:
                    indices = [int(i) for b in batch.indices for i in b]
                    data_log.write(
                        json.dumps({"step": step, "epoch": batch.epoch, "indices": indices}) + "\n"
                    )
                pending = None
                if step % config.log_every == 0:
                    requested = (step, batch.epoch, metrics.request(), window)
                    window = [0, 0.0, 0.0]
                else:
                    pending = (step, batch.epoch, metrics, list(window))
                if any(every and step % every == 0 for every in
                       (config.save_every, config.eval_every, config.export_every)):  # fmt: skip
                    write_requested()  # these wait for the device anyway; the step's record comes first
                if config.save_every and step % config.save_every == 0:
                    checkpoint, saved_step = save_checkpoint(run), step
                if config.eval_every and step % config.eval_every == 0 and run.valid is not None:
                    eval_metrics = {"step": step, **engine.evaluate(evaluation_batches(run))}
                    metrics_log.write(
                        {f"eval_{k}" if k != "step" else k: v for k, v in eval_metrics.items()}, "eval"
                    )
                if config.export_every and step % config.export_every == 0:
                    if saved_step != step:
                        checkpoint, saved_step = save_checkpoint(run), step
                    hf_dir, exported_step = export_hf(run, checkpoint), step
        profiler.close(engine.global_step)
        write_requested()
        if pending is not None:  # the last step was not logged: its metrics are the result's all the same
            step, epoch, metrics, times = pending
            record = train_record(step, epoch, metrics.fetch(), times, run.world_size)
        step = engine.global_step
        if saved_step != step and step > 0:
            checkpoint = save_checkpoint(run)
        if stop_reason != "sigterm" and step > 0:
            if run.valid is not None and (eval_metrics is None or eval_metrics["step"] != step):
                eval_metrics = {"step": step, **engine.evaluate(evaluation_batches(run))}
                metrics_log.write(
                    {f"eval_{k}" if k != "step" else k: v for k, v in eval_metrics.items()}, "eval"
                )
            if exported_step != step:
                hf_dir = export_hf(run, checkpoint)
    metrics_log.close()
    if data_log is not None:
        data_log.close()
    log.info("stopped at step %d (%s)", step, stop_reason)
    return PretrainResult(str(run.out), step, stop_reason, record, eval_metrics,
                          str(checkpoint) if checkpoint else None, str(hf_dir) if hf_dir else None)  # fmt: skip


# --- main -----------------------------------------------------------------------------------------------


def main(config: TrainConfig, do_train: bool = True) -> PretrainResult | Run:
    """Build everything for ``config`` on this rank, then train (or, with ``do_train=False``, return the Run)."""
    rank, world_size = eng.init_distributed()
    run = load_run_inputs(config, rank, world_size)  # refuses mismatched examples before any training
    out = run.out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        refuse_existing_checkpoints(out)
    ds_config, _ = fill_deepspeed_config(
        load_deepspeed_config(config.deepspeed_config), config, run.batch, run.model_config.hidden_size
    )
    if config.init_from:
        model = BertForPreTraining.from_pretrained(resolve_init(config.init_from), **config.model_overrides)
        model.train()
    else:
        torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
        model = BertForPreTraining(run.model_config)
    optimizer = build_optimizer(
        model, config.optimizer, config.lr, config.betas, config.eps, config.weight_decay
    )

    def lr_at(step: int) -> float:
        schedule = lr_multiplier(step, config.warmup_steps, config.total_schedule_steps, config.decay,
                                 config.decay_power, config.min_lr_ratio)  # fmt: skip
        return config.lr * schedule

    num_parameters = model.num_parameters()  # before ZeRO-3 partitions the tensors away
    run.engine = eng.Engine(model, optimizer, ds_config, lr_at, config.seed, compile=config.compile,
                            compile_options=config.compile_options,
                            pack_multiple_of=config.pack_multiple_of)  # fmt: skip
    position = resume(run) if config.resume else DataPosition()
    run.batches = RankBatches(run.train, config.seed, rank, world_size, run.batch.micro_batch_size,
                              run.batch.gradient_accumulation_steps, config.bucket_batches, position)  # fmt: skip
    if rank == 0:
        from data_prep.manifest import write_json_atomic

        write_json_atomic(out / "train_config.json", config.to_dict())
        write_json_atomic(out / "deepspeed_config.json", ds_config)
        log.info(
            "world %d, global batch %d = micro %d × accumulation %d × %d ranks; %d train examples (%d steps/epoch); "
            "model %s, %d parameters; %s, ZeRO-%d, on %s",
            world_size, run.batch.global_batch_size, run.batch.micro_batch_size,
            run.batch.gradient_accumulation_steps, world_size, len(run.train), run.batches.batches_per_epoch,
            config.model_config if not config.init_from else config.init_from, num_parameters,
            run.engine.precision, run.engine.zero_stage, run.engine.device,
        )  # fmt: skip
    if not do_train:
        return run
    result = fit(run)
    result.device = str(run.engine.device)
    if rank == 0:
        from data_prep.manifest import write_json_atomic

        write_json_atomic(out / "result.json", asdict(result))
    return result


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """``--config FILE`` (TrainConfig JSON) with a few overrides; the launcher's --local_rank is accepted."""
    parser = argparse.ArgumentParser(prog="bert.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainConfig JSON (bertpipe pretrain writes one)")
    parser.add_argument("--resume", action="store_true", default=None)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--time-budget")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on CUDA only)")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile-steps", help="START:STOP: torch.profiler over these steps, into OUT/profile/"
    )
    args = parser.parse_args(argv)
    values = json.loads(Path(args.config).read_text())
    for key in ("resume", "max_steps", "time_budget", "compile", "profile_steps"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return TrainConfig.from_dict(values), args


def disk_full_message(error: BaseException, out: Path | None) -> str | None:
    """One line when ``error`` comes from a full disk (or quota), saying where and how much is free; else None."""
    full = next(
        (e for e in error_chain(error) if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS), None
    )
    resume = "free space there (old checkpoints and runs) and run again with --resume"
    if full is None:  # torch.save's RuntimeError has no errno: judged by the space left
        free = free_bytes(out) if out is not None and isinstance(error, RuntimeError) else None
        if free is None or free >= LOW_FREE_BYTES:
            return None
        first = (str(error).strip().splitlines() or [""])[0]
        return f"the disk is full: {out} has {format_bytes(free)} free ({type(error).__name__}: {first}); {resume}"
    where = Path(full.filename) if full.filename else out
    free = free_bytes(where) if where is not None else None
    what = (
        "the disk is full"
        if full.errno == errno.ENOSPC
        else "the disk is full for this user (quota exceeded)"
    )
    space = f" ({format_bytes(free)} free there)" if free is not None else ""
    return f"{what}: could not write {where or 'the output directory'}{space}; {resume}"


def cli(argv: list[str] | None = None) -> int:
    """Per-rank entry point; a failure is written to OUT/logs/error-rank<R>.txt for the launcher's caller.

    Exit code 2 for a user's mistake or a full disk (one line, no traceback in the log), 1 for anything else.
    """
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)  # fmt: skip
    out = None
    try:
        config, _ = parse_args(argv)
        out = Path(config.out)
        result = main(config)
        log.info("done: %s", json.dumps({"step": result.step, "stop_reason": result.stop_reason}))
        return 0
    except Exception as e:
        detail = traceback.format_exc()
        if (full := disk_full_message(e, out)) is not None or isinstance(e, ValueError | FileNotFoundError):
            message, code = full or str(e), 2  # a full disk or a user mistake: one clear line, no traceback
            log.error("%s", message)
        else:
            message, code = f"{type(e).__name__}: {e}", 1
            log.error("%s", detail)
    finally:
        eng.shutdown()  # every exit path: NCCL warns of (and can hang on) a group left to the interpreter
    if out is not None:
        error_file = out / "logs" / f"error-rank{rank}.txt"
        try:  # atomically: on a full disk the launcher finds the whole message or no file, never an empty one
            from data_prep.manifest import write_text_atomic

            error_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(error_file, message + "\n\n" + detail)
        except OSError as e:
            print(f"error: rank {rank}: {message} (its error file {error_file} could not be written: "
                  f"{e.strerror or e})", file=sys.stderr, flush=True)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(cli())
