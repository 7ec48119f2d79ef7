"""A worker process that dies while running a stage's jobs is reported as lost, in one line, exit 2 (issue 18, item 8).

Before, a killed local pool worker gave a BrokenProcessPool traceback, and a per-shard task aborted by its process
exiting (a Dask worker going away: SystemExit, "aborted by Python system exit call") crashed the whole run. A job's
own error still surfaces as itself.
"""

from __future__ import annotations

import os
import signal

import pytest
import typer

from data_prep.parallel import local_mapper
from flows.cli import stage_errors


def killed_on_the_second_job(i: int) -> int:
    """A job whose worker process is killed outright (kill -9, the OOM killer) on the second job."""
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def exits_on_the_second_job(i: int) -> int:
    """A job whose process exits under it, as rich does on a Dask worker whose stdout pipe is gone."""
    if i == 1:
        raise SystemExit(1)
    return i


def bad_input_on_the_second_job(i: int) -> int:
    if i == 1:
        raise ValueError("shard 1: not UTF-8 at byte 7")
    return i


def test_a_killed_local_worker_is_one_line_that_says_lost_and_resume_exit_2(tmp_path, capsys):
    with pytest.raises(typer.Exit) as exit_, stage_errors(tmp_path), local_mapper(2, "fork") as map_jobs:
        map_jobs(killed_on_the_second_job, [(i,) for i in range(4)], "shard: writing")
    assert exit_.value.exit_code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: shard: writing: a worker process was lost"), line
    assert "run the same command again to resume" in line


def test_a_job_error_is_not_taken_for_a_lost_worker():
    with local_mapper(2, start_method="fork") as map_jobs, pytest.raises(ValueError, match="not UTF-8"):
        map_jobs(bad_input_on_the_second_job, [(i,) for i in range(4)], "shard: reading")


def test_a_dask_task_whose_workers_all_died_is_a_lost_worker():
    from data_prep.parallel import is_lost_worker

    scheduler = pytest.importorskip("distributed.scheduler")
    assert is_lost_worker(scheduler.KilledWorker("stage_part-1", "tcp://127.0.0.1:1", 3))
    assert not is_lost_worker(RuntimeError("a job failed"))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_per_shard_task_aborted_by_its_process_exiting_fails_the_run_as_worker_lost():
    from prefect import flow

    from flows.pipeline import PrefectMapper

    @flow(name="fan-out")
    def fan_out(job) -> list:
        return PrefectMapper()(job, [(i,) for i in range(3)], "examples")

    state = fan_out(exits_on_the_second_job, return_state=True)
    # Failed, not Crashed ("aborted by Python system exit call"): the flow saw a lost worker, and says so
    assert state.is_failed(), (state.name, state.message)
    from data_prep.parallel import WorkerLost, find_worker_lost

    error = state.result(raise_on_failure=False)
    lost = find_worker_lost(error)  # what `bertpipe run` reports, one line, exit 2
    assert isinstance(lost, WorkerLost), repr(error)
    assert str(lost).startswith("examples: a worker process was lost"), lost
    assert "aborted by its process exiting: SystemExit(1)" in str(lost)


class Done:
    """A finished future as ``flows.pipeline.task_results`` sees one: ``result()`` returns or raises."""

    def __init__(self, outcome):
        self.outcome = outcome

    def result(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def test_task_results_name_a_crashed_task_a_lost_worker_and_leave_a_job_error_as_it_is():
    from prefect.exceptions import CrashedRun

    from data_prep.parallel import WorkerLost
    from flows.pipeline import task_results

    assert task_results([Done(1), Done(2)], "shard (reading)") == [1, 2]
    for crash in (SystemExit(1), CrashedRun("Execution was aborted by Python system exit call.")):
        with pytest.raises(WorkerLost, match=r"^shard \(reading\): a worker process was lost") as lost:
            task_results([Done(1), Done(crash)], "shard (reading)")
        assert lost.value.__cause__ is crash
    error = ValueError("shard 1: not UTF-8 at byte 7")
    with pytest.raises(ValueError) as raised:
        task_results([Done(error)], "shard (reading)")
    assert raised.value is error
