"""Mappers: how a stage runs its independent jobs, so an orchestrator can run them its own way.

A mapper is any callable ``map_jobs(fn, jobs, desc) -> list`` that returns ``[fn(*job) for job in jobs]``,
in job order. The stages build jobs whose ``fn`` is a module-level function (picklable by reference) and
whose arguments carry everything the job needs, so a job runs the same in this process, in a forked or
spawned worker, as a Prefect task or on a Dask worker that has only imported the module. Jobs write their
own output files; a mapper only moves arguments in and small results (stats dicts) out.

The defaults (``local_mapper``) are what the CLI runs: inline for one worker, else a local process pool
with a progress bar on stderr.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm import tqdm

Mapper = Callable[[Callable[..., Any], list[tuple], str], list]
"""``map_jobs(fn, jobs, desc) -> [fn(*job) for job in jobs]``; ``desc`` names the work for progress/logs."""

START_METHODS = ("fork", "forkserver", "spawn")


class WorkerLost(RuntimeError):
    """A worker process died (killed, out of memory, its process exiting) while it ran one of a stage's jobs."""


def lost_worker_message(desc: str, cause: BaseException | str) -> str:
    """One line for a lost worker: which work, what was seen, and that running the command again resumes."""
    seen = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return (f"{desc}: a worker process was lost (killed or exited) while running its jobs ({seen}); "
            "nothing of the unfinished work passes for complete: run the same command again to resume")  # fmt: skip


def find_worker_lost(error: BaseException) -> WorkerLost | None:
    """The ``WorkerLost`` in ``error``'s chain (``error`` itself, or one it was raised from), else None."""
    from data_prep.manifest import error_chain

    return next((e for e in error_chain(error) if isinstance(e, WorkerLost)), None)


def is_lost_worker(error: BaseException) -> bool:
    """Whether ``error`` says a worker process died rather than a job failed: a broken local process pool, or a
    Dask task whose workers all died (``distributed.scheduler.KilledWorker``)."""
    from data_prep.manifest import error_chain

    return any(
        isinstance(e, BrokenProcessPool) or type(e).__name__ == "KilledWorker" for e in error_chain(error)
    )


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="job", file=sys.stderr, disable=None, leave=False)


def map_inline(fn: Callable[..., Any], jobs: list[tuple], desc: str) -> list:
    """Every job in this process, one after another: the mapper of a one-worker run."""
    results = []
    with _progress(len(jobs), desc) as progress:
        for job in jobs:
            results.append(fn(*job))
            progress.update()
    return results


def _gather(futures: list[cf.Future], desc: str) -> list:
    """The futures' results in their order; the first failure cancels the jobs not started yet."""
    try:
        with _progress(len(futures), desc) as progress:
            for future in cf.as_completed(futures):
                future.result()
                progress.update()
    except BaseException as e:
        for future in futures:
            future.cancel()
        # A worker died: say so in one line, not "terminated abruptly" and a traceback.
        if isinstance(e, BrokenProcessPool):
            raise WorkerLost(lost_worker_message(desc, e)) from e
        raise
    return [future.result() for future in futures]


_INHERITED: tuple[Callable[..., Any], list[tuple]] | None = None  # set in forked workers only


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the process that started it dies, whatever killed it
    (a ``kill -9``, an OOM kill, a scheduler): a worker never outlives its stage run."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _limit_threads(threads: int) -> None:
    _die_with_parent()
    # tokenizers' (rayon) thread pool starts lazily in the child: one core's share per worker, not all cores
    os.environ["RAYON_NUM_THREADS"] = str(threads)


def _inherit_jobs(fn: Callable[..., Any], jobs: list[tuple], threads: int) -> None:
    global _INHERITED
    _INHERITED = (fn, jobs)
    _limit_threads(threads)


def _run_inherited(index: int) -> Any:
    fn, jobs = _INHERITED
    return fn(*jobs[index])


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _map_forked(workers: int) -> Mapper:
    def map_jobs(fn: Callable[..., Any], jobs: list[tuple], desc: str) -> list:
        if len(jobs) <= 1:
            return map_inline(fn, jobs, desc)
        workers_now = min(workers, len(jobs))
        # fork copies fn and jobs into the workers (initargs are not pickled under fork); only job indices
        # and results cross the pipe. The examples stage's jobs share megabytes of negative pools, which
        # would otherwise be pickled once per job.
        with cf.ProcessPoolExecutor(
            workers_now,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_inherit_jobs,
            initargs=(fn, jobs, _threads_per_worker(workers_now)),
        ) as pool:
            return _gather([pool.submit(_run_inherited, i) for i in range(len(jobs))], desc)

    return map_jobs


@contextlib.contextmanager
def local_mapper(workers: int, start_method: str = "fork", preload: Sequence[str] = ()) -> Iterator[Mapper]:
    """The default mapper of a stage run with ``workers`` processes, for the duration of a ``with`` block.

    One worker: ``map_inline``. ``fork``: a pool per call whose workers inherit the jobs instead of
    unpickling them (a parent holding library threads risks a fork mid-lock; the examples stage accepts
    that for its large shared arguments). ``forkserver``/``spawn``: one pool for the whole block, jobs
    pickled; ``preload`` names modules the fork server imports once, so each worker starts warm.
    """
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, got {start_method!r}")
    if workers <= 1:
        yield map_inline
        return
    if start_method == "fork":
        yield _map_forked(workers)
        return
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(["data_prep._die_with_parent", *preload])
    with cf.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_limit_threads, initargs=(_threads_per_worker(workers),)
    ) as pool:

        def map_jobs(fn: Callable[..., Any], jobs: list[tuple], desc: str) -> list:
            if len(jobs) <= 1:
                return map_inline(fn, jobs, desc)
            return _gather([pool.submit(fn, *job) for job in jobs], desc)

        yield map_jobs
