"""The Prefect flow ``bert-pipeline``: shard → vocab → examples → pretrain → finetune, a task per stage.

Every task is a call of the stage's own function (``data_prep``, ``bert``) with paths in and a path out.
Caching is by the stage manifests: before a stage runs, its task computes the fingerprint the stage
directory would have and, when the directory on disk holds a complete manifest with that fingerprint (and
its files are there), returns at once in the state ``Cached``. A deleted or unfinished directory is rebuilt;
a changed setting reruns that stage and those after it. Prefect's own result cache is not used: it can
return a path whose directory has since been deleted.

The data stages fan their per-shard work out as Prefect tasks (``stage-part``), on the flow's thread pool or
on an existing Dask cluster (``dask_address``); the outputs are identical either way. Pretraining runs the
``deepspeed`` launcher in the flow's own thread, streams the ranks' lines into the run log and stops the
ranks (checkpoint, then kill) when the run is cancelled, times out or fails. At the end the run gets a
markdown report, a table of evaluation results and, during pretraining, a progress artifact.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import CancelledRun, CrashedRun
from prefect.states import Cancelled, Completed, State
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from data_prep.manifest import StageError, complete_manifest, invalidate, write_json_atomic
from flows.config import (
    STAGES,
    PipelineConfig,
    PipelineConfigError,
    StageConfigs,
    build_stage_configs,
    check_before_work,
    default_shared,
    load_pipeline_config,
    stage_paths,
)

PROGRESS_EVERY_S = 5.0
CANCEL_POLL_S = 2.0  # how often pretraining looks for a cancel of its flow run
READ_TIMEOUT_S = 10.0  # one read of the run's state; a hung server must not stall the watch


# --- retries: an I/O hiccup or a lost Dask worker is worth a retry, a user mistake is not ------------------


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry on I/O and infrastructure errors; never on a configuration or input mistake (ValueError)."""
    try:
        state.result()
    except (StageError, PipelineConfigError, ValueError, TypeError, KeyError):
        return False
    except Exception:
        return True
    return False


RETRIES = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
               retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)  # fmt: skip


# --- fan-out of a data stage's per-shard jobs ---------------------------------------------------------------


@task(name="stage-part", task_run_name="{desc}-{index}", **RETRIES)
def stage_part(fn: Callable, job: tuple, desc: str, index: int) -> Any:
    """One per-shard job of a data stage (``fn(*job)``), on the flow's task runner or a Dask worker."""
    limit_dask_worker_threads()
    return fn(*job)


def limit_dask_worker_threads() -> None:
    """On a Dask worker, size tokenizers' (rayon) thread pool to the worker's threads, as the local workers
    are sized to their share of the cores: otherwise every worker process starts one thread per core of the
    machine (two 1-thread workers on 2 cores ran 4 tokenising threads). The pool starts lazily, so setting the
    variable before the first job's tokenising is enough; a value the user set is kept."""
    if "RAYON_NUM_THREADS" in os.environ or "distributed" not in sys.modules:
        return
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # not in a Dask worker
        return
    os.environ["RAYON_NUM_THREADS"] = str(max(1, int(getattr(worker, "nthreads", 1) or 1)))


def task_results(futures: list, what: str) -> list:
    """The futures' results in order. A task that crashed because its process was exiting (a Dask worker going
    away: SystemExit, which crashed the whole run "aborted by Python system exit call") or whose Dask workers all
    died raises one ``WorkerLost`` naming ``what`` (the stage and its work), the original error as its cause."""
    from data_prep.parallel import WorkerLost, is_lost_worker, lost_worker_message

    results = []
    for future in futures:
        try:
            results.append(future.result())
        except SystemExit as e:  # raised in the task's process, not here: the flow would crash with it
            seen = f"a task was aborted by its process exiting: {e!r}"
            raise WorkerLost(lost_worker_message(what, seen)) from e
        except Exception as e:
            if is_lost_worker(e) or isinstance(e, CrashedRun):
                raise WorkerLost(lost_worker_message(what, e)) from e
            raise
    return results


class PrefectMapper:
    """A ``data_prep.parallel`` mapper that runs each job as a ``stage-part`` task, locally or on Dask."""

    def __init__(self, dask_address: str | None = None, stage: str | None = None):
        self.dask_address, self.stage = dask_address, stage

    def __call__(self, fn: Callable, jobs: list[tuple], desc: str) -> list:
        what = f"{self.stage} ({desc})" if self.stage and self.stage not in desc else desc
        desc = re.sub(r"[^a-z0-9-]+", "-", desc.lower()).strip("-") or "part"
        if not jobs:
            return []
        parameters = [dict(fn=fn, job=job, desc=desc, index=i) for i, job in enumerate(jobs)]
        if self.dask_address is None:
            # quote: Prefect would otherwise walk every argument (megabytes of negative pools, a vocabulary)
            # looking for futures, once per task (the examples stage took 16 s instead of 3.6 s); the task
            # receives the values as they are. Not on Dask: a quote is a tuple, which Dask takes for a task.
            futures = [
                stage_part.submit(**{**p, "fn": quote(p["fn"]), "job": quote(p["job"])}) for p in parameters
            ]
            return task_results(futures, what)
        from prefect_dask import DaskTaskRunner

        with DaskTaskRunner(address=self.dask_address) as runner:
            futures = [runner.submit(stage_part, p) for p in parameters]
            return task_results(futures, what)


# --- the cache check ----------------------------------------------------------------------------------------


def cached_state(
    directory: Path,
    stage: str,
    expected: Callable[[], str],
    rebuild: bool = True,
    data: Callable[[], Any] | None = None,
) -> State | None:
    """A ``Cached`` state (holding ``data()``, default the directory) when ``directory`` holds a complete
    ``stage`` with the fingerprint ``expected()``; None when the stage has to run.

    An input that is not complete yet means "run it" (the stage then says what is missing). When the files
    do not match the manifest, ``rebuild`` marks the directory unfinished so the stage rebuilds it
    (pretraining instead resumes from its checkpoints and exports again).
    """
    try:
        fp = expected()
    except (StageError, FileNotFoundError):
        return None

    def mismatch(error: Exception) -> None:  # a file missing, truncated or unreadable: rebuild the stage
        get_run_logger().warning("%s: %s; running the stage again", stage, str(error).splitlines()[0])
        if rebuild:
            invalidate(directory)

    if complete_manifest(directory, stage, fp, on_mismatch=mismatch) is None:
        return None
    message = f"{directory}: manifest matches {fp[:12]}"
    get_run_logger().info("%s: cached (%s)", stage, message)
    return Completed(name="Cached", message=message, data=data() if data else str(directory))


def _run_stage(directory: Path, stage: str, expected: Callable[[], str], run: Callable[[], Any]) -> Any:
    if (state := cached_state(directory, stage, expected)) is not None:
        return state
    run()
    return str(directory)


# --- the stage tasks: a call of the stage function each ------------------------------------------------------


@task(name="shard", task_run_name="shard", **RETRIES)
def shard_task(config, dask_address: str | None = None) -> str:
    """Raw inputs → corpus shards (``data_prep.shard.shard_corpus``)."""
    from data_prep import shard

    return _run_stage(Path(config.out), "shard", lambda: shard.expected_fingerprint(config),
                      lambda: shard.shard_corpus(config, map_jobs=PrefectMapper(dask_address, "shard")))  # fmt: skip


@task(name="vocab", task_run_name="vocab", **RETRIES)
def vocab_task(config) -> str:
    """Corpus → WordPiece vocabulary (``data_prep.vocab.train_vocab``)."""
    from data_prep import vocab

    return _run_stage(Path(config.out), "vocab", lambda: vocab.expected_fingerprint(config),
                      lambda: vocab.train_vocab(config))  # fmt: skip


@task(name="examples", task_run_name="examples", **RETRIES)
def examples_task(config, dask_address: str | None = None) -> str:
    """Corpus + vocabulary → MLM/NSP examples (``data_prep.examples_stage.generate_examples``)."""
    from data_prep import examples_stage

    return _run_stage(Path(config.out), "examples", lambda: examples_stage.expected_fingerprint(config),
                      lambda: examples_stage.generate_examples(config, map_jobs=PrefectMapper(dask_address, "examples")))  # fmt: skip


class _Poller:
    """Runs ``_poll`` on a daemon thread from ``with`` entry until exit (``done`` is set then), in a copy of the
    caller's context: Prefect's settings (the API URL) live in context variables."""

    thread_name = "poller"

    def __enter__(self):
        self.done = threading.Event()
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._poll,),
                                       name=self.thread_name, daemon=True)  # fmt: skip
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(timeout=10)

    def _poll(self) -> None:
        raise NotImplementedError


class _Progress(_Poller):
    """A progress artifact updated from metrics.jsonl while the ranks train."""

    thread_name = "pretrain-progress"

    def __init__(self, metrics_file: Path, max_steps: int | None):
        from prefect.artifacts import create_progress_artifact

        self.metrics_file, self.max_steps = metrics_file, max_steps
        self.artifact_id = create_progress_artifact(0.0, key="pretraining-progress",
                                                    description="pretraining: share of max_steps done")  # fmt: skip

    def _poll(self) -> None:
        from prefect.artifacts import update_progress_artifact

        last = None
        while not self.done.wait(PROGRESS_EVERY_S):
            step = _last_step(self.metrics_file)
            if step is not None and step != last and self.max_steps:
                last = step
                with contextlib.suppress(Exception):  # a missed progress update must not fail training
                    update_progress_artifact(self.artifact_id, min(100.0, 100.0 * step / self.max_steps))


class CancelWatch(_Poller):
    """Polls the flow run's state while the ranks train and sets ``stop`` once the run is Cancelling.

    Prefect's own watch (the worker's cancellation observer) gives up for good after three failed polls, 20-30 s
    without the server ("Flow run cancellation disabled"), and a `bertpipe run` has no worker at all. This one
    retries through any outage, so a cancel sent once the server is back still stops the ranks.
    """

    thread_name = "pretrain-cancel-watch"

    def __init__(self, read_state: Callable[[], Any], stop: threading.Event, logger: Any,
                 every_s: float = CANCEL_POLL_S):  # fmt: skip
        self.read_state, self.stop, self.logger, self.every_s = read_state, stop, logger, every_s
        self.seen = threading.Event()  # a cancel was seen (and ``stop`` set)

    def _poll(self) -> None:
        unreachable = False
        while not self.done.wait(self.every_s):
            try:
                state = self.read_state()
            except Exception as e:  # the server is down or restarting: keep asking
                if not unreachable:
                    self.logger.warning("cannot read this run's state (%s); a cancel is still looked for every "
                                        "%g s", str(e).splitlines()[0] if str(e) else type(e).__name__,
                                        self.every_s)  # fmt: skip
                unreachable = True
                continue
            if unreachable:
                self.logger.info("the Prefect API answers again; this run can be cancelled")
                unreachable = False
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                self.logger.info("cancel requested (%s): stopping pretraining, checkpoint first", state.name)
                self.seen.set()
                self.stop.set()
                return


def flow_run_state_reader() -> Callable[[], Any] | None:
    """A function that reads the current flow run's state from the Prefect API; None outside a flow run."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    flow_run_id = context.flow_run.id

    def read() -> Any:
        from prefect.client.orchestration import get_client

        # A client of its own (other httpx settings): the run's shared client retries a refused connection with
        # backoff, so one read would sleep through the outage and see a cancel up to ~30 s late.
        with get_client(sync_client=True, httpx_settings={"timeout": READ_TIMEOUT_S}) as client:
            return client.read_flow_run(flow_run_id).state

    return read


def _last_step(metrics_file: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        lines = metrics_file.read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    return None


@task(name="pretrain", task_run_name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(config, num_gpus: int | None = None, hostfile: str | None = None,
                  deadline_s: float | None = None) -> str:  # fmt: skip
    """Examples → pretrained model (``bert.pretrain.stage``: the deepspeed launcher, ranks' lines in the log)."""
    from bert.pretrain import stage as pretrain_stage

    logger = get_run_logger()
    out = Path(config.out)
    expected = lambda: pretrain_stage.expected_fingerprint(config)  # noqa: E731
    if (
        state := cached_state(out, "pretrain", expected, rebuild=False, data=lambda: str(out / "hf"))
    ) is not None:
        return state
    rank_log = logging.getLogger("bertpipe.ranks")
    stop, done, outcome = threading.Event(), threading.Event(), {}

    def train() -> None:
        try:
            outcome["value"] = pretrain_stage.run_pretrain_stage(
                config, num_gpus=num_gpus, hostfile=hostfile, resume=None, stop_event=stop,
                on_line=lambda line: (logger.info("%s", line), rank_log.debug("%s", line)), deadline_s=deadline_s,
            )  # fmt: skip
        except BaseException as e:
            outcome["error"] = e
        finally:
            done.set()

    # The launcher runs in a thread so that this (main) thread keeps Prefect's SIGTERM bridge: a cancel raises
    # TerminationSignal here, the ranks checkpoint (stop_event) and Prefect records the run as Cancelled.
    # Event.wait, not Thread.join: a join interrupted by a signal marks a live thread stopped (CPython 3.11).
    # A cancel can also arrive by the run's state alone (CancelWatch): the ranks checkpoint, the run ends Cancelled.
    read_state = flow_run_state_reader()
    watch = CancelWatch(read_state, stop, logger, CANCEL_POLL_S) if read_state is not None else None
    with _Progress(out / "metrics.jsonl", config.max_steps), watch or contextlib.nullcontext():
        threading.Thread(target=train, name="pretrain-launch", daemon=True).start()
        try:
            while not done.wait(0.2):
                pass
        except BaseException:  # TerminationSignal (a cancel), KeyboardInterrupt: checkpoint, then re-raise
            stop.set()
            while not done.is_set():
                with contextlib.suppress(BaseException):  # a second signal must not leave the ranks behind
                    done.wait()
            raise
    if "error" in outcome:
        raise outcome["error"]
    manifest, result = outcome["value"]
    if watch is not None and watch.seen.is_set():
        step = result.step if result is not None else "its end"
        return Cancelled(message=f"pretraining was cancelled at step {step}; its checkpoint is in {out}/checkpoints: "
                                 "run the pipeline again to resume")  # fmt: skip
    if manifest is None:
        raise RuntimeError(
            f"pretraining stopped at step {result.step} ({result.stop_reason}) before it was complete; "
            f"its checkpoint is in {out}/checkpoints: run the pipeline again to resume"
        )
    return str(out / "hf")


@task(name="finetune", task_run_name="finetune-{config.task}", **RETRIES)
def finetune_task(config) -> dict:
    """A pretrained model → fine-tuned on one task, evaluated (``bert.finetune.stage.main``); its metrics."""
    from bert.finetune import stage as finetune_stage

    out = Path(config.out)
    metrics = lambda: json.loads((out / "metrics.json").read_text())  # noqa: E731
    if (
        state := cached_state(
            out, "finetune", lambda: finetune_stage.expected_fingerprint(config), data=metrics
        )
    ) is not None:
        return state
    return finetune_stage.main(config)


BASELINES_CACHE = (
    ".bertpipe-baselines"  # beside the run directories: runs share the baselines they have alike
)
BASELINES_FILE = "baselines.json"  # in a run: task -> baseline label -> its fine-tuning directory


def baselines_cache(run_dir: Path) -> Path:
    """Where a run's baselines are kept, by fingerprint: beside the run, so later runs reuse them."""
    return Path(run_dir).absolute().parent / BASELINES_CACHE


@task(name="baseline", task_run_name="baseline-{config.task}-{label}", **RETRIES)
def baseline_task(config, baseline: str, cache: str, label: str) -> dict:
    """``config``'s fine-tuning started from a baseline instead (``bert.finetune.baselines``), cached by its
    fingerprint under ``cache``; ``{"dir", "metrics"}``."""
    from bert.finetune import stage as finetune_stage
    from bert.finetune.baselines import baseline_config

    resolved = baseline_config(config, baseline, cache)
    out = Path(resolved.out)
    result = lambda: {"dir": str(out), "metrics": json.loads((out / "metrics.json").read_text())}  # noqa: E731
    if (
        state := cached_state(
            out, "finetune", lambda: finetune_stage.expected_fingerprint(resolved), data=result
        )
    ) is not None:
        return state
    return {"dir": str(out), "metrics": finetune_stage.main(resolved)}


# --- the report -----------------------------------------------------------------------------------------------


def artifact_slug(name: str) -> str:
    """The key prefix of a pipeline's artifacts: its name in lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "pipeline"


def _previous_figures(key: str) -> dict | None:
    """The figures of the last completed run that wrote the artifact ``key`` (a table of figure/value rows)."""
    with contextlib.suppress(Exception):  # no previous run, or an API without artifacts: nothing to compare
        from prefect.artifacts import Artifact

        artifact = Artifact.get(key)
        if artifact is not None:
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            return {row["figure"]: row["value"] for row in rows}
    return None


@task(name="report", task_run_name="report", cache_policy=NO_CACHE)
def report_task(stage_dirs: dict[str, str], slug: str) -> str:
    """Markdown report (with the previous run's figures beside this run's) and a table of evaluation results."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from flows import report

    dirs = {name: Path(path) for name, path in stage_dirs.items()}
    figures = report.collect_figures(dirs)
    previous = _previous_figures(f"{slug}-figures")
    png = report.training_curves_png(dirs["pretrain"] / "metrics.jsonl") if "pretrain" in dirs else None
    note = report.degenerate_note(figures)
    markdown = report.render_markdown(figures, dirs, previous=previous, png=png, notes=[note] if note else [])
    create_markdown_artifact(markdown, key=f"{slug}-report", description="bertpipe run report")
    rows = report.evaluation_rows(dirs)
    if rows:
        create_table_artifact(rows, key=f"{slug}-evaluation", description="fine-tuning results per seed")
    comparison = report.baseline_rows(dirs)
    if comparison:
        create_table_artifact(comparison, key=f"{slug}-baselines",
                              description="the pretrained model beside each baseline: medians, lift, verdict")  # fmt: skip
    create_table_artifact([{"figure": k, "value": v} for k, v in figures.items()], key=f"{slug}-figures",
                          description="headline figures of this run (the next run compares against them)")  # fmt: skip
    return markdown


# --- the flow -------------------------------------------------------------------------------------------------


def task_value(result: Any) -> Any:
    """A task's return value, whether it returned a value or a (Cached) state."""
    return result.result() if isinstance(result, State) else result


def prepare(
    config: str = "demo", overrides: list[str] | tuple[str, ...] = (), out: str | Path = "runs/demo",
    shared: str | Path | None = None, stages: list[str] | tuple[str, ...] | None = None,
) -> tuple[PipelineConfig, StageConfigs]:  # fmt: skip
    """The validated pipeline config and every stage's typed config; PipelineConfigError before any work, for a
    setting or for what the ``stages`` to run (default all) would fail on later (``check_before_work``)."""
    stages = tuple(stages or STAGES)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise PipelineConfigError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    pipeline = load_pipeline_config(config, list(overrides))
    shared_data = Path(shared or default_shared()) / "data"
    configs = build_stage_configs(pipeline, shared_data, Path(out))
    check_before_work(pipeline, configs, shared_data, stages)
    return pipeline, configs


@flow(name="bert-pipeline", log_prints=True)
def bert_pipeline(
    config: str = "demo",
    overrides: list[str] | None = None,
    out: str = "runs/demo",
    shared: str | None = None,
    stages: list[str] | None = None,
    dask_address: str | None = None,
    pretrain_timeout_s: float | None = None,
) -> dict:
    """The pipeline: ``config`` is a preset name or JSON file, ``overrides`` flat ``section.key=value`` strings.

    ``stages`` limits the run to some stages (their inputs must be complete); ``dask_address`` runs the data
    stages' per-shard tasks on that Dask cluster; ``pretrain_timeout_s`` stops pretraining (checkpointed)
    after that many seconds.
    """
    logger = get_run_logger()
    stages = tuple(stages or STAGES)
    pipeline, configs = prepare(config, overrides or (), out, shared, stages)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    paths = stage_paths(root, pipeline)
    timings, cached = {}, {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        state = call()
        timings[name] = round(time.perf_counter() - started, 2)
        cached[name] = isinstance(state, State) and state.name == "Cached"
        return task_value(state)

    if "shard" in stages:
        timed("shard", lambda: shard_task(configs.shard, dask_address))
    if "vocab" in stages:
        timed("vocab", lambda: vocab_task(configs.vocab))
    if "examples" in stages:
        timed("examples", lambda: examples_task(configs.examples, dask_address))
    if "pretrain" in stages and configs.pretrain is not None:
        try:
            timed("pretrain", lambda: pretrain_task(configs.pretrain, configs.num_gpus, configs.hostfile,
                                                    pretrain_timeout_s))  # fmt: skip
        except CancelledRun as cancelled:  # pretraining's CancelWatch saw a cancel: the ranks checkpointed
            return Cancelled(message=str(cancelled))
    from bert.finetune.baselines import baseline_label
    from flows.report import baseline_rows

    finetune, baselines = [], {}
    if "finetune" in stages:
        for ft in configs.finetune:
            finetune.append(timed(f"finetune-{ft.task}", lambda ft=ft: finetune_task(ft)))
            for spec in configs.baselines.get(ft.task, []):
                label = baseline_label(spec)
                result = timed(f"baseline-{ft.task}-{label}", lambda ft=ft, spec=spec, label=label:
                               baseline_task(ft, spec, str(baselines_cache(root)), label))  # fmt: skip
                baselines.setdefault(ft.task, {})[label] = result["dir"]
        if baselines:
            write_json_atomic(root / BASELINES_FILE, baselines)
    existing = {name: str(path) for name, path in paths.items() if path.exists()}
    if (root / BASELINES_FILE).is_file():
        existing["baselines"] = str(root / BASELINES_FILE)
    report_task(existing, artifact_slug(pipeline.name))
    summary = {
        "out": str(root),
        "timings_s": timings,
        "cached": cached,
        "stages": existing,
        "finetune": [{"task": s.get("task"), "metric": s.get("metric"), "median": s.get("median"),
                      "degenerate_seeds": s.get("degenerate_seeds")} for s in finetune],
        "baselines": baseline_rows({k: Path(v) for k, v in existing.items()}),
    }  # fmt: skip
    write_json_atomic(root / "pipeline_summary.json", summary)
    logger.info("pipeline done: %s", json.dumps({"timings_s": timings, "cached": cached}))
    return summary
