"""A run stays cancellable through a Prefect server outage (issue 18, item 7).

Prefect's own cancellation watch (the worker's observer) gives up after three failed polls, about 24 s without the
server, and a later `prefect flow-run cancel` left the run Cancelling while the ranks trained on. Pretraining's own
``CancelWatch`` retries through the outage: a cancel sent once the server is back stops the ranks with a checkpoint
and the run ends Cancelled.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prefect.states import Cancelling, Running
from test_data import make_training_stage
from test_launch import GUARD_S, latest_step, processes_of, steps_logged, tiny_config

from flows import pipeline

OUTAGE_POLLS = 5  # more failed reads than Prefect's observer survives (three)
RUN_GUARD_S = 60  # pretraining's own deadline: it only ends a run whose cancel went unseen


class FlakyServer:
    """A flow run state reader whose first ``failures`` reads fail as a stopped server does, then ``read()``."""

    def __init__(self, read, failures: int = OUTAGE_POLLS):
        self.read, self.failures, self.calls = read, failures, 0
        self.back = threading.Event()  # set by the first read that answers

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise httpx.ConnectError("All connection attempts failed")
        self.back.set()
        return self.read()


def test_the_watch_survives_an_outage_and_stops_training_on_a_later_cancel(caplog):
    caplog.set_level(logging.INFO)
    states = iter([Running()] * 3 + [Cancelling()])
    server = FlakyServer(lambda: next(states))
    stop = threading.Event()
    logger = logging.getLogger("test.cancel_watch")
    with pipeline.CancelWatch(server, stop, logger, every_s=0.01) as watch:
        assert stop.wait(GUARD_S), "no stop after the outage and the cancel"
    assert watch.seen.is_set()
    assert server.calls == OUTAGE_POLLS + 4  # it kept asking through the outage, stopped at the cancel
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "All connection attempts failed" in warnings[0], (
        warnings
    )  # once, not per poll
    assert "answers again" in caplog.text and "cancel requested (Cancelling)" in caplog.text


def test_the_watch_ignores_a_running_state_and_ends_with_its_block():
    stop = threading.Event()
    with pipeline.CancelWatch(lambda: Running(), stop, logging.getLogger("test"), every_s=0.01) as watch:
        time.sleep(0.1)
    assert not watch.thread.is_alive() and not stop.is_set() and not watch.seen.is_set()


@pytest.fixture
def fake_ranks(monkeypatch):
    """Pretraining runs tests/fake_launcher.py instead of `deepspeed` (no start-up, the same files)."""
    import bert.pretrain.launch as launch_module

    fake = Path(__file__).with_name("fake_launcher.py")
    monkeypatch.setattr(launch_module, "launcher_command", lambda config_file, *a, **k: [
        sys.executable, str(fake), "--module", "bert.pretrain", "--config", str(config_file)])  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness", "fake_ranks")
def test_a_cancel_after_an_outage_checkpoints_the_ranks_and_the_run_ends_cancelled(tmp_path, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    stage = make_training_stage(tmp_path / "stage", num_train=64, num_valid=16)
    out = tmp_path / "run"
    monkeypatch.setattr(pipeline, "CANCEL_POLL_S", 0.2, raising=False)
    servers: list[FlakyServer] = []
    real_reader = getattr(pipeline, "flow_run_state_reader", None)

    def reader_behind_an_outage():
        servers.append(FlakyServer(real_reader()))
        return servers[-1]

    monkeypatch.setattr(pipeline, "flow_run_state_reader", reader_behind_an_outage, raising=False)
    run_ids = []

    @flow(name="pretrain-only")
    def pretrain_only(config):
        from prefect.runtime import flow_run

        run_ids.append(flow_run.id)
        return pipeline.pretrain_task(config, 1, None, RUN_GUARD_S, return_state=True)

    def cancel_once_the_server_is_back() -> None:  # what `prefect flow-run cancel` does
        give_up = time.monotonic() + GUARD_S
        # once the ranks train and the server answers again (a build without a watch: as soon as they train)
        while not (steps_logged(out) >= 1 and (not servers or servers[0].back.is_set())):
            if time.monotonic() > give_up:
                return
            time.sleep(0.05)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_ids[0], Cancelling(), force=True)

    canceller = threading.Thread(
        target=contextvars.copy_context().run, args=(cancel_once_the_server_is_back,)
    )
    canceller.start()
    state = pretrain_only(tiny_config(stage, out), return_state=True)
    canceller.join()
    assert state.is_cancelled(), (state.name, state.message)
    assert servers[0].calls > OUTAGE_POLLS  # the outage outlasted Prefect's own watch; this one kept on
    step = latest_step(out)
    assert step >= 1 and not processes_of(out)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_ids[0]).state.is_cancelled()
        (task_run,) = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    assert task_run.state.is_cancelled() and f"cancelled at step {step}" in task_run.state.message, (
        task_run.state
    )
