"""bert.pretrain.launch as an orchestrator task runs it: from any thread, output by line, stopped by an event, left by an
exception, or its process killed outright; no launcher or rank may outlive it. And the launcher commands for
several nodes, as DeepSpeed's runner turns them into processes."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_data import make_training_stage

from bert.pretrain.config import TrainConfig
from bert.pretrain.launch import launch

BERTPIPE = Path(sys.executable).parent / "bertpipe"
GUARD_S = 300  # a deadline that only ends a run whose test went wrong, so that it cannot hang


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> tuple[Path, Path]:
    return make_training_stage(tmp_path_factory.mktemp("launch"), num_train=64, num_valid=16)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks inherit it: 2 shared cores


def tiny_config(stage: tuple[Path, Path], out: Path, **overrides) -> TrainConfig:
    examples, model_config = stage
    values = dict(examples=str(examples), out=str(out), model_config=str(model_config), micro_batch_size=4,
                  decay="constant", max_steps=100_000, progress_bar=False, tensorboard=False)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(out: Path, num_steps: int, timeout_s: float = 240) -> None:
    give_up = time.monotonic() + timeout_s
    while steps_logged(out) < num_steps:
        assert time.monotonic() < give_up, f"fewer than {num_steps} steps in {out}/metrics.jsonl"
        time.sleep(0.1)


def processes_of(out: Path) -> list[psutil.Process]:
    """Live processes whose command line names the run directory (launcher, its children, the ranks)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(out) in a for a in p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.fixture
def out(tmp_path: Path):
    """The run directory; whatever of the run still lives when the test ends is killed (a failed test must not
    leave ranks training on a shared machine)."""
    out = tmp_path / "run"
    yield out
    for p in processes_of(out):
        with contextlib.suppress(psutil.Error):
            p.kill()


def latest_step(out: Path) -> int:
    return int((out / "checkpoints/latest").read_text().strip().removeprefix("step-"))


@pytest.fixture
def fake(monkeypatch):
    """launch() runs tests/fake_launcher.py instead of `deepspeed`: the same process tree and files, no start-up."""
    import bert.pretrain.launch as launch_module

    fake_launcher = Path(__file__).with_name("fake_launcher.py")
    monkeypatch.setattr(
        launch_module,
        "launcher_command",
        lambda config_file, *args, **kwargs: [
            sys.executable,
            str(fake_launcher),
            "--module",
            "bert.pretrain",
            "--config",
            str(config_file),
        ],  # fmt: skip
    )


class ClockAfterFirstStep:
    """The ``time`` module as launch sees it, with a monotonic clock that jumps an hour ahead once the run has
    logged a step: a deadline passes after the ranks started, however busy the machine."""

    def __init__(self, out: Path):
        self.out = out

    def monotonic(self) -> float:
        return time.monotonic() + (3600 if steps_logged(self.out) >= 1 else 0)

    def __getattr__(self, name):
        return getattr(time, name)


def test_launch_from_a_worker_thread_hands_every_output_line_to_on_line(stage, out: Path, fake):
    lines: list[str] = []
    outcome: dict = {}

    def task() -> None:  # as an orchestrator's worker thread would run it: no signal handlers there
        try:
            outcome["result"] = launch(tiny_config(stage, out, max_steps=3), num_gpus=1, on_line=lines.append)
        except BaseException as e:
            outcome["error"] = e

    worker = threading.Thread(target=task)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert "error" not in outcome, repr(outcome.get("error"))
    assert outcome["result"].step == 3 and outcome["result"].stop_reason == "max_steps"
    assert any("[rank 0]" in line and "stopped at step 3 (max_steps)" in line for line in lines)
    assert not any(line.endswith(("\n", "\r")) for line in lines)
    assert not processes_of(out)


def test_stop_event_checkpoints_leaves_no_process_and_resume_continues(stage, out: Path, caplog, fake):
    caplog.set_level(logging.WARNING, logger="bert.pretrain.launch")
    stop = threading.Event()
    watcher = threading.Thread(target=lambda: (wait_for_steps(out, 2), stop.set()), daemon=True)
    watcher.start()
    stopped = launch(tiny_config(stage, out), num_gpus=1, stop_event=stop, deadline_s=GUARD_S)
    assert "stopping (stop_event set)" in caplog.text
    assert stopped.stop_reason == "sigterm" and stopped.step >= 2
    assert latest_step(out) == stopped.step
    assert not processes_of(out)

    lines: list[str] = []
    config = tiny_config(stage, out, resume=True, max_steps=stopped.step + 2)
    resumed = launch(config, num_gpus=1, on_line=lines.append)
    assert resumed.stop_reason == "max_steps" and resumed.step == stopped.step + 2
    assert any(f"resumed from step-{stopped.step}" in line for line in lines)
    assert latest_step(out) == stopped.step + 2


class Terminated(BaseException):
    """What an orchestrator raises from its own signal handler to end a task (Prefect's TerminationSignal)."""


def test_an_exception_in_the_waiting_thread_stops_the_ranks_gracefully_then_propagates(
    stage, out: Path, fake
):

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGUSR1, terminate)
    main = threading.get_ident()
    watcher = threading.Thread(
        target=lambda: (wait_for_steps(out, 2), signal.pthread_kill(main, signal.SIGUSR1)), daemon=True
    )
    watcher.start()
    try:
        with pytest.raises(Terminated):
            launch(tiny_config(stage, out), num_gpus=1, deadline_s=GUARD_S)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not processes_of(out)
    assert latest_step(out) >= 2  # the ranks had their graceful stop before launch gave up on them


def test_an_exception_in_on_line_propagates_and_leaves_no_process(stage, out: Path, fake):

    def on_line(line: str) -> None:
        if steps_logged(out) >= 2:
            raise RuntimeError("the orchestrator's log sink failed")

    with pytest.raises(RuntimeError, match="log sink failed"):
        launch(tiny_config(stage, out), num_gpus=1, on_line=on_line, deadline_s=GUARD_S)
    assert not processes_of(out)
    assert latest_step(out) >= 2


def test_the_deadline_stops_the_run_gracefully(stage, out: Path, caplog, fake, monkeypatch):
    import bert.pretrain.launch as launch_module

    caplog.set_level(logging.WARNING, logger="bert.pretrain.launch")
    monkeypatch.setattr(launch_module, "time", ClockAfterFirstStep(out))
    result = launch(tiny_config(stage, out), num_gpus=1, deadline_s=30)
    assert "deadline of 30 s reached" in caplog.text
    assert result.stop_reason == "sigterm" and result.step >= 1
    assert latest_step(out) == result.step
    assert not processes_of(out)


def test_a_launch_stopped_before_any_rank_started_says_so(stage, out: Path, monkeypatch):
    """A stop that comes before the launcher started a rank: the launcher's group gets SIGTERM, and launch
    says that the ranks could not checkpoint (a launcher that ignores nothing, here `sleep`)."""
    import bert.pretrain.launch as launch_module

    monkeypatch.setattr(launch_module, "launcher_command", lambda config_file, *a, **k: ["sleep", "600"])
    stop = threading.Event()
    stop.set()
    with pytest.raises(launch_module.LaunchError, match="before the ranks could checkpoint"):
        launch(tiny_config(stage, out), num_gpus=1, stop_event=stop)


LAUNCH_WITH_ON_LINE = """
import sys
from bert.pretrain.launch import launch
from bert.pretrain.config import TrainConfig
launch(TrainConfig.from_json_file(sys.argv[1]), num_gpus=1, on_line=print)
"""


@pytest.mark.slow
def test_ranks_checkpoint_and_exit_when_the_parent_is_killed(stage, out: Path, tmp_path: Path):
    """kill -9 of the process that called launch: nothing can clean up, the real ranks notice on their own. The
    ranks' output pipe is broken too (its reader died), which must not keep them from stopping."""
    config_file = tmp_path / "config.json"
    config = tiny_config(stage, out)
    config.to_json_file(config_file)
    command = [sys.executable, "-c", LAUNCH_WITH_ON_LINE, str(config_file)]
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            wait_for_steps(out, 2)
        finally:
            process.kill()
            process.wait()
    give_up = time.monotonic() + 120
    while processes_of(out) and time.monotonic() < give_up:
        time.sleep(0.2)
    assert not processes_of(out), processes_of(out)
    assert latest_step(out) >= 2
    assert json.loads((out / "result.json").read_text())["stop_reason"] == "sigterm"


# --- several nodes: the launcher commands, checked against DeepSpeed's own runner (no ssh, no ranks) ------------


def deepspeed_would_run(command: list[str], monkeypatch) -> tuple[list[str], dict, list]:
    """What DeepSpeed's runner (`deepspeed ARGS`) starts for ``command``: (command, environment, ssh calls).
    Nothing runs: ssh, pdsh and the process start are faked; `ssh HOST hostname -I` answers 10.0.0.1."""
    from deepspeed.launcher import runner

    started: dict = {}
    ssh_calls: list = []

    class Started:
        returncode = 0

        def __init__(self, cmd, env):
            started.update(cmd=cmd, env=env)

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Started)
    monkeypatch.setattr(runner.subprocess, "check_call", lambda cmd, **kw: ssh_calls.append(cmd))
    monkeypatch.setattr(
        runner.subprocess, "check_output", lambda cmd, **kw: ssh_calls.append(cmd) or b"10.0.0.1\n"
    )
    monkeypatch.setattr(runner.signal, "signal", lambda *args: None)  # pdsh mode installs handlers
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kw: f"/usr/bin/{name}")  # "pdsh is installed"
    runner.main(command[1:])
    return started["cmd"], started["env"], ssh_calls


@pytest.fixture
def launching_env(monkeypatch):
    """The environment bert.pretrain.launch gives the deepspeed runner: the parent-pid watch variables included."""
    from bert.pretrain.run import PARENT_HOST_ENV, PARENT_PID_ENV

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv(PARENT_PID_ENV, str(os.getpid()))
    monkeypatch.setenv(PARENT_HOST_ENV, socket.gethostname())


def test_hostfile_runs_one_launcher_per_host_over_pdsh_without_the_parent_pid(
    tmp_path, launching_env, monkeypatch
):
    from bert.pretrain.launch import check_launch, launcher_command

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 8-GPU nodes\nworker-1 slots=8\nworker-2 slots=8\n")
    assert check_launch(None, str(hostfile)) == 16
    command = launcher_command(tmp_path / "launch_config.json", None, str(hostfile), 29612)
    assert command[1:] == ["--hostfile", str(hostfile), "--master_port", "29612", "--module", "bert.pretrain",
                           "--config", str(tmp_path / "launch_config.json")]  # fmt: skip

    cmd, env, ssh_calls = deepspeed_would_run(command, monkeypatch)
    assert cmd[:6] == ["pdsh", "-S", "-f", "1024", "-w", "worker-1,worker-2"]
    # One shell line for every host: exports; cd; python -m deepspeed.launcher.launch ... bert.pretrain ...
    remote = " ".join(cmd[6:])
    assert f"cd {os.getcwd()};" in remote and "-m deepspeed.launcher.launch" in remote
    assert "--node_rank=%n" in remote  # pdsh replaces %n by the host's place in the -w list
    assert "--master_addr=10.0.0.1 --master_port=29612" in remote  # worker-1's address, asked over ssh
    assert " --module " in remote
    assert remote.endswith(f" bert.pretrain --config {tmp_path / 'launch_config.json'}")
    world = remote.split("--world_info=")[1].split()[0]
    assert json.loads(base64.urlsafe_b64decode(world)) == {
        "worker-1": list(range(8)),
        "worker-2": list(range(8)),
    }
    # The remote shells get only PYTHON* (and .deepspeed_env) variables: no rank there watches a local pid.
    assert "BERTPIPE_" not in remote and "PYTHONPATH=" in remote
    assert ssh_calls and all("worker-1" in call for call in ssh_calls)  # ssh check, then `hostname -I`


def test_no_ssh_runs_this_nodes_ranks_only_with_the_node_list_and_node_rank(
    tmp_path, launching_env, monkeypatch
):
    """One launch per node starts DeepSpeed's per-node launcher itself, exactly as `deepspeed --no_ssh` would."""
    from bert.pretrain.launch import Nodes, check_launch, launcher_command

    nodes = Nodes(num_nodes=3, node_rank=1, master_addr="10.1.2.3")
    assert check_launch(2, None, nodes) == 6
    command = launcher_command(tmp_path / "config.json", 2, None, 29500, nodes)
    assert command[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    assert {"--master_addr=10.1.2.3", "--master_port=29500", "--node_rank=1", "--module"} <= set(command)
    assert command[-3:] == ["bert.pretrain", "--config", str(tmp_path / "config.json")]
    world = next(a for a in command if a.startswith("--world_info=")).removeprefix("--world_info=")
    assert json.loads(base64.urlsafe_b64decode(world)) == {
        "node-0": [0, 1],
        "node-1": [0, 1],
        "node-2": [0, 1],
    }
    # The oracle: what DeepSpeed's runner starts for the same node with a node list.
    node_list = tmp_path / "nodes"
    node_list.write_text("".join(f"node-{i} slots=2\n" for i in range(3)))
    runner_args = ["--hostfile", str(node_list), "--no_ssh", "--node_rank", "1", "--master_addr", "10.1.2.3",
                   "--master_port", "29500", "--module", "bert.pretrain", "--config", str(tmp_path / "config.json")]  # fmt: skip
    cmd, env, ssh_calls = deepspeed_would_run(["deepspeed", *runner_args], monkeypatch)
    assert not ssh_calls
    assert cmd == command


def test_several_ranks_on_one_node_start_the_per_node_launcher_as_the_runner_would(
    tmp_path, launching_env, monkeypatch
):
    from bert.pretrain.launch import launcher_command

    config = tmp_path / "launch_config.json"
    command = launcher_command(config, 2, None, 29612)
    assert command[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    world = next(a for a in command if a.startswith("--world_info=")).removeprefix("--world_info=")
    assert json.loads(base64.urlsafe_b64decode(world)) == {"localhost": [0, 1]}
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "device_count", lambda self: 2)  # the runner counts devices
    cmd, env, ssh_calls = deepspeed_would_run(
        ["deepspeed", "--num_gpus", "2", "--master_port", "29612", "--module", "bert.pretrain", "--config",
         str(config)], monkeypatch)  # fmt: skip
    assert not ssh_calls
    assert cmd == command


@pytest.mark.parametrize(
    ("num_gpus", "hostfile", "nodes", "port", "message"),
    [
        (None, None, dict(num_nodes=2, node_rank=2, master_addr="h"), None, "--node-rank must be from 0 to"),
        (None, None, dict(num_nodes=2, node_rank=-1, master_addr="h"), None, "--node-rank must be from 0 to"),
        (None, None, dict(num_nodes=0), None, "--nnodes must be at least 1"),
        (None, None, dict(num_nodes=2, node_rank=1), None, "--nnodes 2 needs --master-addr"),
        (None, "hosts", dict(num_nodes=2, master_addr="h"), None, "give one or the other"),
        (2, "hosts", None, None, "give --num-gpus or --hostfile, not both"),
        (1, None, None, 70000, "--master-port must be from 1 to 65535"),
        (None, "bad-hosts", None, None, "is not 'HOST slots=N'"),
    ],
)
def test_nonsense_launch_settings_are_refused(tmp_path, num_gpus, hostfile, nodes, port, message):
    from bert.pretrain.launch import Nodes, check_launch

    (tmp_path / "hosts").write_text("worker-1 slots=8\n")
    (tmp_path / "bad-hosts").write_text("worker-1 8\n")
    with pytest.raises(ValueError, match=message):
        check_launch(num_gpus, hostfile and str(tmp_path / hostfile), nodes and Nodes(**nodes), port)


def test_the_parent_pid_watch_applies_on_the_launching_host_only(monkeypatch):
    from bert.pretrain.rank import StopSignal
    from bert.pretrain.run import PARENT_HOST_ENV, PARENT_PID_ENV

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    monkeypatch.setenv(PARENT_PID_ENV, str(gone.pid))
    monkeypatch.setenv(PARENT_HOST_ENV, socket.gethostname())
    assert StopSignal().received  # the launching process on this host is gone
    monkeypatch.setenv(PARENT_HOST_ENV, "another-host")
    assert not StopSignal().received  # a pid of another host says nothing about this one's processes
    monkeypatch.delenv(PARENT_PID_ENV)
    monkeypatch.delenv(PARENT_HOST_ENV)
    assert not StopSignal().received  # a rank the ssh launcher started on another node: no watch


def test_one_rank_on_one_node_runs_without_the_deepspeed_launcher(tmp_path):
    """A world of one is the rank itself; several ranks run under the per-node launcher; a hostfile's nodes the runner."""
    from bert.pretrain.launch import Nodes, launcher_command

    config = tmp_path / "launch_config.json"
    assert launcher_command(config, 1, None, 29500) == [sys.executable, "-u", "-m", "bert.pretrain", "--config",
                                                        str(config)]  # fmt: skip
    assert launcher_command(config, None, None, 29500)[:3] == [sys.executable, "-u", "-m"]
    assert launcher_command(config, 2, None, 29500)[3] == "deepspeed.launcher.launch"
    two_nodes = Nodes(num_nodes=2, node_rank=0, master_addr="127.0.0.1")
    assert launcher_command(config, 1, None, 29500, two_nodes)[3] == "deepspeed.launcher.launch"
    assert Path(launcher_command(config, None, str(tmp_path / "hosts"), 29500)[0]).name == "deepspeed"
