"""bert.launch as an orchestrator task runs it: from any thread, output by line, stopped by an event, left by an
exception, or its process killed outright; no launcher or rank may outlive it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_data import make_training_stage

from bert.launch import launch
from bert.train_config import TrainConfig

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


@pytest.mark.slow
def test_launch_from_a_worker_thread_hands_every_output_line_to_on_line(stage, out: Path):
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


@pytest.mark.slow
def test_stop_event_checkpoints_leaves_no_process_and_resume_continues(stage, out: Path, caplog):
    caplog.set_level(logging.WARNING, logger="bert.launch")
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
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[stopped.step - 1 :] == [stopped.step, stopped.step + 1, stopped.step + 2, stopped.step + 2]


class Terminated(BaseException):
    """What an orchestrator raises from its own signal handler to end a task (Prefect's TerminationSignal)."""


@pytest.mark.slow
def test_an_exception_in_the_waiting_thread_stops_the_ranks_gracefully_then_propagates(stage, out: Path):

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


@pytest.mark.slow
def test_an_exception_in_on_line_propagates_and_leaves_no_process(stage, out: Path):

    def on_line(line: str) -> None:
        if steps_logged(out) >= 2:  # the progress bar prints a line every second
            raise RuntimeError("the orchestrator's log sink failed")

    with pytest.raises(RuntimeError, match="log sink failed"):
        launch(tiny_config(stage, out, progress_bar=True), num_gpus=1, on_line=on_line, deadline_s=GUARD_S)
    assert not processes_of(out)
    assert latest_step(out) >= 2


@pytest.mark.slow
def test_the_deadline_stops_the_run_gracefully(stage, out: Path, caplog):
    caplog.set_level(logging.WARNING, logger="bert.launch")
    result = launch(tiny_config(stage, out), num_gpus=1, deadline_s=30)  # ~10 s to the first step here
    assert "deadline of 30 s reached" in caplog.text
    assert result.stop_reason == "sigterm" and result.step >= 1
    assert latest_step(out) == result.step
    assert not processes_of(out)


LAUNCH_WITH_ON_LINE = """
import sys
from bert.launch import launch
from bert.train_config import TrainConfig
launch(TrainConfig.from_json_file(sys.argv[1]), num_gpus=1, on_line=print)
"""


@pytest.mark.slow
@pytest.mark.parametrize("parent", ["bertpipe pretrain", "launch(on_line=print)"])
def test_ranks_checkpoint_and_exit_when_the_parent_is_killed(stage, out: Path, tmp_path: Path, parent: str):
    """kill -9 of the process that called launch: nothing can clean up, the ranks notice on their own. With
    on_line the ranks' output pipe is broken too (its reader died), which must not keep them from stopping."""
    config_file = tmp_path / "config.json"
    config = tiny_config(stage, out)
    config.to_json_file(config_file)
    if parent == "bertpipe pretrain":
        command = [str(BERTPIPE), "pretrain", "--config", str(config_file), "--num-gpus", "1"]
    else:
        command = [sys.executable, "-c", LAUNCH_WITH_ON_LINE, str(config_file)]
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            wait_for_steps(out, 2)
        finally:
            process.kill()
            process.wait()
    give_up = time.monotonic() + 60
    while processes_of(out) and time.monotonic() < give_up:
        time.sleep(0.2)
    assert not processes_of(out), processes_of(out)
    assert latest_step(out) >= 2
    assert json.loads((out / "result.json").read_text())["stop_reason"] == "sigterm"
