"""Pretraining from a parent process: the `deepspeed` launcher as a watched subprocess, one rank per device.

``launch(config, num_gpus)`` is what ``bertpipe pretrain`` and the Prefect task call. It checks the inputs
before any rank starts, runs the ranks (``launcher_command``) in a session of its own and returns rank 0's
PretrainResult, or raises LaunchError with the failing rank's message. It may run in any thread:

- ``on_line`` receives every line the launcher and the ranks print (without it they go to the terminal);
- SIGTERM/SIGINT/SIGHUP (when called from the main thread), ``stop_event`` and ``deadline_s`` stop the run
  gracefully: the ranks agree on a step, checkpoint and exit, and the result's stop_reason is "sigterm";
- however launch is left (a return, an error, any exception in the waiting thread) no launcher or rank
  outlives it: what still runs gets the graceful stop for ``stop_grace_s`` seconds, then SIGKILL;
- when this process dies without cleaning up (SIGKILL, the OOM killer) the ranks see that the pid in
  BERTPIPE_PARENT_PID is gone and stop as on SIGTERM; the launcher then exits by itself.

Several nodes, two ways. ``hostfile``: this process starts every node over ssh (DeepSpeed's pdsh runner; the
ranks there get only PYTHON*, NCCL* and ``~/.deepspeed_env``'s variables, so no parent-pid watch; a stop request
reaches them through the runner, which kills the remote launchers, which SIGTERM their ranks).
``nodes`` (``Nodes``): one launch per node, as a batch scheduler or Kubernetes starts them, each with the same
settings and its own ``node_rank`` (DeepSpeed's ``--no_ssh``). Node 0 holds global rank 0 and owns OUT's files;
the other nodes' launches write nothing there themselves and return None.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

from bert.model import BertConfig
from bert.pretrain import ds_config
from bert.pretrain.config import TrainConfig
from bert.pretrain.run import (
    PARENT_HOST_ENV,
    PARENT_PID_ENV,
    PretrainResult,
    build_model_config,
    load_run_inputs,
    refuse_existing_checkpoints,
    resolve_init,
)
from data_prep.manifest import LOW_FREE_BYTES, format_bytes, free_bytes

log = logging.getLogger("bert.pretrain.launch")

POLL_S = 0.2  # how often the waiting thread looks at the launcher, stop_event and the deadline
DEFAULT_MASTER_PORT = 29500  # torchrun's and DeepSpeed's default; every node must name the same one


class LaunchError(ValueError):
    """A run that failed on some rank; the message is that rank's error."""


@dataclass(frozen=True)
class Nodes:
    """One launch per node (SLURM, Kubernetes: no ssh): how many nodes, which one this is, where node 0 is."""

    num_nodes: int = 1
    """Nodes in the job; each runs the same command with --num-gpus ranks of its own."""
    node_rank: int = 0
    """This node, 0 to num_nodes - 1; node 0 holds global rank 0, which writes the run's outputs."""
    master_addr: str | None = None
    """Address of node 0 that every node can reach; needed with more than one node."""

    def __post_init__(self):
        if self.num_nodes < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.num_nodes}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(
                f"--node-rank must be from 0 to --nnodes - 1 = {self.num_nodes - 1}, got {self.node_rank}"
            )
        if self.num_nodes > 1 and not self.master_addr:
            raise ValueError(
                f"--nnodes {self.num_nodes} needs --master-addr: the address of node rank 0 that every node reaches"
            )

    @property
    def multi(self) -> bool:
        return self.num_nodes > 1


def read_hostfile(hostfile: str) -> dict[str, int]:
    """Slots per host of a DeepSpeed hostfile ("worker-1 slots=8" lines, # comments), refused as DeepSpeed would."""
    path = Path(hostfile)
    if not path.is_file():
        raise ValueError(f"hostfile {hostfile} does not exist")
    slots: dict[str, int] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"(\S+)\s+slots=(\d+)", line)  # DeepSpeed's own pattern (launcher/runner.py)
        if match is None:
            raise ValueError(f"hostfile {hostfile}: line {line!r} is not 'HOST slots=N'")
        if match[1] in slots:
            raise ValueError(f"hostfile {hostfile} names {match[1]} twice")
        slots[match[1]] = int(match[2])
    if sum(slots.values()) < 1:
        raise ValueError(f"hostfile {hostfile} lists no slots")
    return slots


def check_launch(
    num_gpus: int | None, hostfile: str | None, nodes: Nodes | None = None, master_port: int | None = None
) -> int:
    """Refuse launch settings that make no sense (ValueError naming the flag); else the number of ranks:
    --num-gpus (on each of ``nodes``), or the slots of a hostfile."""
    if num_gpus is not None and num_gpus < 1:
        raise ValueError(f"--num-gpus must be at least 1, got {num_gpus}")
    if master_port is not None and not 0 < master_port < 65536:
        raise ValueError(f"--master-port must be from 1 to 65535, got {master_port}")
    if hostfile is not None:
        if num_gpus is not None:
            raise ValueError("give --num-gpus or --hostfile, not both")
        if nodes is not None:
            raise ValueError(
                "--hostfile starts every node from here over ssh; --nnodes/--node-rank/--master-addr are for "
                "one launch per node: give one or the other"
            )
        return sum(read_hostfile(hostfile).values())
    return (num_gpus or 1) * (nodes.num_nodes if nodes is not None else 1)


# --- does the run fit this machine? Checked before any work starts (bertpipe pretrain, the flow's prepare) --------

OVERSUBSCRIBE_ENV = "BERTPIPE_ALLOW_OVERSUBSCRIBE"  # "1": run more CPU ranks than this machine has cores
# Two CPU ranks run (slowly) on one core too, and two is what the demo and the tests launch: never refused.
MIN_CPU_RANKS = 2
# What a CPU rank holds besides its model: Python, torch, DeepSpeed, gloo, the data. A tiny-model rank measured
# 540 MB resident, 380 MB of it its own (the rest: shared libraries); counted low, so that the check never refuses
# a run that fits.
RANK_OVERHEAD_BYTES = 350 * 2**20
# fp32 weights and gradients, and AdamW's or LAMB's two moments: the least a training rank keeps per parameter.
WEIGHT_BYTES, GRADIENT_BYTES, OPTIMIZER_BYTES = 4, 4, 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's cpuset), else the machine's."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parameter_count(model: BertConfig) -> int:
    """Parameters of ``BertForPreTraining(model)`` (the decoder's weight is tied to the word embeddings)."""
    h, i = model.hidden_size, model.intermediate_size
    embeddings = (model.vocab_size + model.max_position_embeddings + model.type_vocab_size) * h + 2 * h
    # attention: q, k, v and output (h² + h each), two LayerNorms (2h each), the MLP in and out
    layer = 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)
    pooler = h * h + h
    heads = (h * h + h) + 2 * h + model.vocab_size + (2 * h + 2)  # MLM transform + LayerNorm + bias, NSP
    return embeddings + model.num_hidden_layers * layer + pooler + heads


def rank_memory_bytes(model: BertConfig, zero_stage: int, world_size: int) -> int:
    """A low estimate of one CPU rank's memory: the fixed overhead plus fp32 weights, gradients and optimizer
    states, less what ZeRO partitions over the ranks (stage 1: optimizer states, 2: and gradients, 3: and
    weights). Activations are left out: the estimate must never exceed what a run really takes."""
    n = parameter_count(model)
    weights, gradients, optimizer = n * WEIGHT_BYTES, n * GRADIENT_BYTES, n * OPTIMIZER_BYTES
    if zero_stage >= 1:
        optimizer //= world_size
    if zero_stage >= 2:
        gradients //= world_size
    if zero_stage >= 3:
        weights //= world_size
    return RANK_OVERHEAD_BYTES + weights + gradients + optimizer


def local_accelerator() -> str:
    """The DeepSpeed accelerator this machine's ranks get: DS_ACCELERATOR, else cuda when torch sees a GPU."""
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")


def check_attention(model: BertConfig, precision: str, accelerator: str | None) -> None:
    """Refuse (ValueError) ``unpad_attention='varlen'`` where its flash-attention kernel cannot run: without
    torch.nn.attention.varlen (torch 2.10 or later), on a CPU or in fp32 (``accelerator``; None: not known
    here, a hostfile's remote hosts). Each rank would otherwise fail at its first step."""
    if model.unpad_attention != "varlen":
        return
    fix = "or keep unpad_attention='padded' (the default)"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        raise ValueError(
            f"unpad_attention='varlen' needs torch 2.10 or later (torch.nn.attention.varlen); this is torch "
            f"{torch.__version__}: install a newer torch {fix}"
        )
    if accelerator == "cpu":
        raise ValueError(
            f"unpad_attention='varlen' runs flash attention on CUDA GPUs only, and these ranks would train on the "
            f"CPU: {fix.removeprefix('or ')} on the CPU"
        )
    if precision not in ("bf16", "fp16"):
        raise ValueError(
            f"unpad_attention='varlen' runs flash attention, in bf16 or fp16 only, but this run trains in "
            f"{precision}: give --precision bf16 (or a DeepSpeed JSON with bf16 or fp16 enabled) {fix}"
        )


def check_devices(local_ranks: int, world_size: int, model: BertConfig, zero_stage: int = 0) -> None:
    """Refuse (ValueError) ``local_ranks`` ranks that this machine cannot hold: on CUDA more than its devices;
    on the CPU more than its cores (unless BERTPIPE_ALLOW_OVERSUBSCRIBE=1) or more than its available memory."""
    fewer = "--num-gpus; pretrain.num_gpus in a pipeline"
    accelerator = local_accelerator()
    if accelerator == "cuda":  # DeepSpeed gives each local rank a device of its own
        devices = torch.cuda.device_count()
        if local_ranks > devices:
            raise ValueError(
                f"{local_ranks} ranks on this node, which has {devices} CUDA device"
                f"{'' if devices == 1 else 's'}: give at most {devices} ({fewer})"
            )
        return
    if accelerator != "cpu":  # another DeepSpeed accelerator: its own runtime counts its devices
        return
    cores = usable_cores()
    if local_ranks > max(cores, MIN_CPU_RANKS) and os.environ.get(OVERSUBSCRIBE_ENV) != "1":
        raise ValueError(
            f"{local_ranks} ranks would train on this machine's {cores} CPU cores: give at most "
            f"{max(cores, MIN_CPU_RANKS)} ranks ({fewer}), or set {OVERSUBSCRIBE_ENV}=1 to run more ranks than cores"
        )
    per_rank = rank_memory_bytes(model, zero_stage, world_size)
    available = psutil.virtual_memory().available
    if local_ranks * per_rank > available:
        raise ValueError(
            f"{local_ranks} ranks need about {format_bytes(local_ranks * per_rank)} of memory ({format_bytes(per_rank)} each: "
            f"{format_bytes(RANK_OVERHEAD_BYTES)} of runtime and {format_bytes(per_rank - RANK_OVERHEAD_BYTES)} of weights, "
            f"gradients and optimizer states), but only {format_bytes(available)} is available here: give fewer ranks "
            f"({fewer}) or a smaller model"
        )


def planned_model_config(config: TrainConfig, vocab_size: int | None = None) -> BertConfig:
    """The model ``config`` will train, known before its examples exist: ``init_from``'s config.json, a config
    file or a preset (its vocabulary ``vocab_size``; when that is not known yet, a placeholder of 1)."""
    if config.init_from:
        return BertConfig.from_json_file(resolve_init(config.init_from), **config.model_overrides)
    # build_model_config reads only these two of the examples' metadata
    vocabulary = SimpleNamespace(vocab_size=vocab_size or 1, special_ids={})
    return build_model_config(config.model_config, vocabulary, config.model_overrides)


def check_pretrain_launch(
    config: TrainConfig,
    num_gpus: int | None,
    hostfile: str | None,
    nodes: Nodes | None = None,
    master_port: int | None = None,
    vocab_size: int | None = None,
) -> int:
    """What can be checked of a pretraining run before its examples exist (ValueError, one problem each):
    the launch settings, the model config, the batch arithmetic, the DeepSpeed JSON against the training
    config, whether this machine holds its ranks (``check_devices``; not for a hostfile's remote hosts) and
    can run the model's attention (``check_attention``), and no stale JIT build lock waits for them
    (``check_extension_locks``).
    Returns the number of ranks. ``vocab_size``: the vocabulary's, when known (only the memory estimate uses it).
    """
    world_size = check_launch(num_gpus, hostfile, nodes, master_port)
    deepspeed = ds_config.load_deepspeed_config(config.deepspeed_config)
    model = planned_model_config(config, vocab_size)
    if hostfile is None:
        zero_stage = (deepspeed.get("zero_optimization") or {}).get("stage", 0)
        check_devices(num_gpus or 1, world_size, model, zero_stage if isinstance(zero_stage, int) else 0)
    batch = config.batch_sizes(world_size)
    _, precision = ds_config.fill_deepspeed_config(deepspeed, config, batch, model.hidden_size)
    check_attention(model, precision, local_accelerator() if hostfile is None else None)
    check_extension_locks()  # a killed op build's lock would make every rank wait on it, silently
    return world_size


def launcher_command(
    config_file: Path,
    num_gpus: int | None,
    hostfile: str | None,
    master_port: int,
    nodes: Nodes | None = None,
) -> list[str]:
    """The command that runs bert.pretrain on every rank (of this node, with ``nodes``).

    One rank on one node runs as ``python -u -m bert.pretrain`` itself: a world of one needs no launcher.
    Several ranks on this node, or this node's ranks of several (``nodes``, DeepSpeed's --no_ssh), run under
    DeepSpeed's per-node launcher (``python -m deepspeed.launcher.launch``) started directly with the command
    the `deepspeed` runner would build: the runner adds a process and ~4 s of start-up (it imports DeepSpeed)
    only to compute that command. A ``hostfile`` (nodes started over ssh) goes through the `deepspeed` runner.
    """
    multi = nodes is not None and nodes.multi
    if hostfile is None and not multi and (num_gpus or 1) == 1:
        return [sys.executable, "-u", "-m", "bert.pretrain", "--config", str(config_file)]
    if hostfile is None:
        ranks = list(range(num_gpus or 1))
        if multi:  # the node names are labels: only their order and slots count (node 0 holds rank 0)
            world, master_addr = {f"node-{i}": ranks for i in range(nodes.num_nodes)}, nodes.master_addr
        else:
            world, master_addr = {"localhost": ranks}, "127.0.0.1"
        world_info = base64.urlsafe_b64encode(json.dumps(world).encode("utf-8")).decode("utf-8")
        node_rank = [f"--node_rank={nodes.node_rank}"] if multi else []
        return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                f"--master_addr={master_addr}", f"--master_port={master_port}", *node_rank, "--module",
                "--enable_each_rank_log=None", "--log_level=info", "bert.pretrain", "--config", str(config_file)]  # fmt: skip
    beside = Path(sys.executable).parent / "deepspeed"
    launcher = str(beside) if beside.exists() else shutil.which("deepspeed")
    if launcher is None:
        raise ValueError(
            "the `deepspeed` launcher is not installed in this environment: pip install deepspeed"
        )
    return [launcher, "--hostfile", hostfile, "--master_port", str(master_port), "--module", "bert.pretrain",
            "--config", str(config_file)]  # fmt: skip


def free_port() -> int:
    """A TCP port free on this machine now: other runs here may hold 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_rank(args: list[str]) -> bool:
    """A rank runs `python -u -m bert.pretrain ...`; the launcher only names the module (`--module bert.pretrain`)."""
    return any(a == "-m" and b == "bert.pretrain" for a, b in zip(args, args[1:], strict=False))


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class GroupStop:
    """SIGTERM, SIGHUP, Ctrl-C, stop_event or the deadline: stop every local rank cleanly, then let the launcher finish.

    The ranks get SIGTERM directly (they agree on a step, checkpoint and exit 0, and the launcher exits
    normally). Signalling the launcher instead would not do: DeepSpeed's per-node launcher kills ranks that
    take over 30 s to checkpoint, and the `deepspeed` runner (a hostfile's) does not forward SIGTERM. Before any rank exists (or for ranks on other nodes, which the pdsh runner signals itself)
    the launcher's process group gets the SIGTERM. A second request kills the group.
    """

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.ranks: list[psutil.Process] = []  # the local rank processes when the first request came
        self.signals = 0
        self.reason: str | None = None  # why the first request came

    def handle(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """The first request stops the ranks gracefully, a second one kills the launcher's process group."""
        self.signals += 1
        if self.signals > 1:
            self._signal_group(signal.SIGKILL)
            return
        self.reason = reason
        log.warning(
            "stopping (%s): every rank checkpoints after its current step (signal again to kill)", reason
        )
        self.ranks = []
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if _is_rank(p.cmdline()):
                        self.ranks.append(p)
        if not self.ranks:
            self._signal_group(signal.SIGTERM)
        for p in self.ranks:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def wait_for_ranks(self) -> None:
        """Return once the signalled ranks have exited (the launcher may exit before them)."""
        while any(_alive(p) for p in self.ranks):
            time.sleep(POLL_S)


class LineReader(threading.Thread):
    """Hands every line of the launcher's merged output to ``on_line``; after ``on_line`` raises it keeps
    draining the pipe (a full pipe would block the ranks mid-step) and keeps the error for the waiting thread."""

    def __init__(self, stream, on_line: Callable[[str], object]):
        super().__init__(name="bertpipe-launch-output", daemon=True)
        self.stream, self.on_line = stream, on_line
        self.error: BaseException | None = None

    def run(self) -> None:
        for line in self.stream:
            if self.error is None:
                try:
                    self.on_line(line.rstrip("\n"))
                except BaseException as e:  # launch re-raises it in the waiting thread
                    self.error = e


def run_processes(process: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every live process below it or in its session (ranks whose launcher died included)."""
    found: dict[int, psutil.Process] = {}
    if process.poll() is None:
        with contextlib.suppress(psutil.Error):
            launcher = psutil.Process(process.pid)
            found = {p.pid: p for p in (launcher, *launcher.children(recursive=True))}
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if p.pid not in found and os.getsid(p.pid) == process.pid:
                found[p.pid] = p
    return [p for p in found.values() if _alive(p)]


def stop_leftovers(process: subprocess.Popen, stop: GroupStop, grace_s: float) -> None:
    """Leave nothing of the run running: the graceful stop (checkpoint) for up to ``grace_s`` s, then SIGKILL."""
    try:
        if run_processes(process):
            if not stop.signals:
                stop.request("launch is being left")
            give_up = time.monotonic() + grace_s
            while time.monotonic() < give_up and run_processes(process):
                time.sleep(POLL_S)
    finally:  # a second exception during the grace period still ends here
        leftovers = run_processes(process)
        if leftovers:
            log.warning("killing %d processes of the run that did not stop in time", len(leftovers))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            for p in leftovers:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(leftovers, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def wait_for_launcher(
    process: subprocess.Popen,
    stop: GroupStop,
    reader: LineReader | None,
    stop_event: threading.Event | None,
    deadline_s: float | None,
) -> int:
    """The launcher's exit code, once it and the ranks asked to stop have exited; polls so that a stop_event,
    the deadline and the output reader's errors are noticed within ``POLL_S``."""
    give_up = None if deadline_s is None else time.monotonic() + deadline_s
    while (code := process.poll()) is None:
        if reader is not None and reader.error is not None:
            raise reader.error
        if not stop.signals:
            if stop_event is not None and stop_event.is_set():
                stop.request("stop_event set")
            elif give_up is not None and time.monotonic() >= give_up:
                log.warning("deadline of %g s reached: stopping the run", deadline_s)
                stop.request(f"deadline of {deadline_s:g} s")
        time.sleep(POLL_S)
    stop.wait_for_ranks()
    return code


def run_launcher(
    command: list[str],
    env: dict[str, str],
    on_line: Callable[[str], object] | None,
    stop_event: threading.Event | None,
    deadline_s: float | None,
    stop_grace_s: float,
) -> tuple[int, GroupStop]:
    """Run the launcher until it and its ranks are done: (its exit code, the stop requests it got)."""
    log.info("launching: %s", " ".join(command))
    piped = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    # Its own session: Ctrl-C reaches this process only, and GroupStop decides what the ranks get.
    process = subprocess.Popen(command, env=env, start_new_session=True, **(piped if on_line else {}))
    stop = GroupStop(process)
    reader = LineReader(process.stdout, on_line) if on_line else None
    previous = {}
    try:
        if reader is not None:
            reader.start()
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            previous = {
                s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            }
        code = wait_for_launcher(process, stop, reader, stop_event, deadline_s)
    finally:
        try:
            stop_leftovers(process, stop, stop_grace_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if reader is not None:
                reader.join(timeout=10)  # the pipe ends once every process that held it is gone
                if not reader.is_alive():
                    process.stdout.close()
    if reader is not None and reader.error is not None:
        raise reader.error
    return code, stop


def rank_failure(errors: list[Path]) -> str:
    """What the first of the ranks' error files says: its first paragraph, or that the rank left no message."""
    path = errors[0]
    rank = path.stem.removeprefix("error-rank")
    try:
        message = path.read_text(errors="replace").split("\n\n")[0].strip()
    except OSError:
        message = ""
    if not message:
        return (
            f"rank {rank} failed without a message (its error file {path} is empty: was the disk full?); "
            "see the ranks' output (above, or in the run's log)"
        )
    return f"rank {rank} failed: {message}\n(full traceback: {path})"


STALE_LOCK_S = 600.0  # a DeepSpeed op build takes 1-5 minutes; a lock twice as old with no holder is stale


def torch_extensions_root() -> Path:
    """Where torch builds JIT extensions for this Python and torch (as ``cpp_extension._get_build_directory``)."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured is not None:
        return Path(configured)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accelerator}"
    return Path(get_default_build_root()) / tag


def _build_dir_in_use(build_dir: Path) -> bool:
    """Whether a process of this user works in ``build_dir`` (its cwd, as ninja and the compiler have) or
    holds a file there open (torch's FileBaton keeps the lock's descriptor open while it builds)."""
    uid = os.getuid()
    inside = str(build_dir.resolve())
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.uids().real != uid:
                continue
            paths = [process.cwd(), *(f.path for f in process.open_files())]
            if any(p == inside or p.startswith(inside + os.sep) for p in paths):
                return True
    return False


def stale_extension_locks(root: Path | None = None, stale_after_s: float = STALE_LOCK_S) -> list[Path]:
    """The JIT build locks under ``root`` (default: torch's extensions root) that a killed build left behind.

    torch's FileBaton creates ``<root>/<op>/lock`` with O_EXCL before building and deletes it after; a build
    killed by SIGKILL never deletes it, and every later build of that op (DeepSpeed's shm op on each CPU
    launch) waits for it forever without a word. A lock counts as stale when it is older than
    ``stale_after_s`` and no process of this user has its build directory open or as its working directory.
    """
    root = torch_extensions_root() if root is None else Path(root)
    stale = []
    for lock in sorted(root.glob("*/lock")):
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime >= stale_after_s and not _build_dir_in_use(lock.parent):
                stale.append(lock)
    return stale


def check_extension_locks(root: Path | None = None) -> None:
    """Refuse to launch (ValueError) while a stale JIT build lock would make the ranks wait forever.

    Not deleted here: the extensions cache may be shared (a home directory on NFS, containers sharing it),
    where a build on another machine is invisible to this one's process table; the user knows.
    """
    stale = stale_extension_locks(root)
    if stale:
        minutes = (time.time() - stale[0].stat().st_mtime) / 60
        raise ValueError(
            f"a killed DeepSpeed op build left the lock {stale[0]} ({minutes:.0f} min old, no process holds it) "
            f"and every launch would wait on it forever; if no build runs elsewhere, remove it: "
            f"rm {' '.join(str(p) for p in stale)}"
        )


def sweep_shm_buffers() -> None:
    """Free the /dev/shm all-reduce buffers that ranks killed outright left behind (one line when any)."""
    removed, freed = ds_config.sweep_shm_buffers()
    if removed:
        log.info(
            "removed %d DeepSpeed all-reduce buffer%s left in %s by killed ranks (%s freed)",
            removed, "" if removed == 1 else "s", ds_config.SHM_BUFFERS, format_bytes(freed),
        )  # fmt: skip


def launch(
    config: TrainConfig,
    num_gpus: int | None = None,
    hostfile: str | None = None,
    *,
    nodes: Nodes | None = None,
    master_port: int | None = None,
    on_line: Callable[[str], object] | None = None,
    stop_event: threading.Event | None = None,
    deadline_s: float | None = None,
    stop_grace_s: float = 60.0,
) -> PretrainResult | None:
    """Check the inputs, run every rank through the deepspeed launcher, return rank 0's result.

    ``nodes``: this is one of several launches, one per node (see the module docstring); a node other than
    node 0 returns None once its ranks are done, since rank 0 and its result are on node 0. ``master_port``:
    where rank 0 listens (default: with ``nodes``, 29500; else a port free here). Raises LaunchError with the
    failing rank's message (the earliest error file) when a rank fails, and re-raises an exception of
    ``on_line``. See the module docstring for the stop and clean-up rules.
    """
    # Flags, DeepSpeed JSON, devices and build locks, then the examples against the model and tokenizer:
    # everything fails here, before any launch (not 7-10 s later on a rank).
    world_size = check_pretrain_launch(config, num_gpus, hostfile, nodes, master_port)
    multi = nodes is not None and nodes.multi
    leader = not multi or nodes.node_rank == 0  # holds rank 0: the one launch that tidies OUT
    load_run_inputs(config, 0, world_size)
    out = Path(config.out)
    if not config.resume:
        refuse_existing_checkpoints(out)
    out.mkdir(parents=True, exist_ok=True)
    if leader:  # before node 0's ranks start, so before any rank of this run (on any node) can train or fail
        for stale in (out / "logs").glob("error-rank*.txt"):
            stale.unlink()
        (out / "result.json").unlink(missing_ok=True)
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid()), PARENT_HOST_ENV: socket.gethostname()}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    # This node's own files (the node list, and on nodes > 0 the config) stay off the shared OUT.
    with tempfile.TemporaryDirectory(prefix="bertpipe-launch-") as scratch:
        config_file = out / "launch_config.json" if leader else Path(scratch) / "launch_config.json"
        config.to_json_file(config_file)
        port = master_port or (DEFAULT_MASTER_PORT if multi else free_port())
        command = launcher_command(config_file, num_gpus, hostfile, port, nodes)
        if command[0] == sys.executable:  # the one rank itself: a world of one, whatever this process got
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(name, None)
        sweep_shm_buffers()
        try:
            code, stop = run_launcher(command, env, on_line, stop_event, deadline_s, stop_grace_s)
        finally:
            ds_config.remove_shm_buffers(port)  # what killed ranks could not remove themselves
    if leader and (out / "result.json").exists():
        result = PretrainResult(**json.loads((out / "result.json").read_text()))
        # On SIGTERM the deepspeed launcher terminates the ranks (which checkpoint first) and exits 1.
        if code == 0 or result.stop_reason == "sigterm":
            return result
    errors = sorted((out / "logs").glob("error-rank*.txt"), key=lambda p: p.stat().st_mtime)
    if not leader and (code == 0 or (stop.reason is not None and not errors)):
        log.info("node %d: its ranks are done; node 0 reports the run", nodes.node_rank)
        return None
    if errors:
        raise LaunchError(rank_failure(errors))
    if stop.reason is not None:
        raise LaunchError(
            f"stopped ({stop.reason}) before the ranks could checkpoint (launcher exit code {code})"
        )
    free = free_bytes(out)
    if free is not None and free < LOW_FREE_BYTES:  # a rank on a full disk cannot write its error file
        raise LaunchError(
            f"the ranks failed without a message (launcher exit code {code}) and {out} has {format_bytes(free)} "
            "free: the disk is full; free space there and run again with --resume"
        )
    raise LaunchError(f"the deepspeed launcher exited with code {code}; see the ranks' output above")
