"""The real thing: a Prefect server (the session's test server, the API app `prefect server start` serves),
`bertpipe deploy`, a process worker and runs of `bert-pipeline/tiny`.

A run cancelled during pretraining leaves no launcher or rank behind and keeps its checkpoint; the next run on
the same trajectory resumes from that checkpoint with the data stages Cached and completes with its artifacts
and metrics. Each command is the one an operator types (prefect.yaml's header).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "bert-pipeline/tiny"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
RUN_TIMEOUT_S = 600


@dataclass
class Stack:
    root: Path  # every run's out directory lies below it
    api: str  # http://127.0.0.1:N/api
    env: dict  # PREFECT_API_URL, PREFECT_HOME, ... for the CLI commands
    worker: subprocess.Popen
    worker_log: Path

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.api}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> list | dict:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_run_id: str) -> dict:
        return self.get(f"/flow_runs/{flow_run_id}")

    def state_type(self, flow_run_id: str) -> str:
        return self.flow_run(flow_run_id)["state"]["type"]

    def logs(self, flow_run_id: str) -> str:
        """Every log line of the flow run (the ranks' lines included), oldest first."""
        lines: list[str] = []
        while True:
            page = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200,
                                              "offset": len(lines), "sort": "TIMESTAMP_ASC"})  # fmt: skip
            lines += [r["message"] for r in page]
            if len(page) < 200:
                return "\n".join(lines)

    def diagnosis(self, flow_run_id: str | None = None) -> str:
        """The worker's last lines (and the run's logs): what an assertion message needs to be useful."""
        worker = self.worker_log.read_text(errors="replace")[-6000:] if self.worker_log.exists() else ""
        run = ""
        if flow_run_id:
            with contextlib.suppress(Exception):
                run = self.logs(flow_run_id)[-6000:]
        return f"\n--- worker log (tail) ---\n{worker}\n--- flow run log ---\n{run}"


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process group, then SIGKILL to the group if it has not exited within grace_s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, even when the leader exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_processes(root: Path) -> list[psutil.Process]:
    """Live processes of this test's runs: launcher and ranks name their config file below ``root``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(p.info["cmdline"] or [])
            if str(root) in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
                found.append(p)
    return found


@pytest.fixture(scope="module")
def stack(prefect_harness, tmp_path_factory, shared_data) -> Stack:
    """The session's Prefect test server (the API app `prefect server start` serves, started once for every
    flow test), `bertpipe deploy --name tiny` and a process worker polling its pool."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("deployment")
    home = root / "prefect-home"
    home.mkdir()
    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api, "BERTPIPE_SHARED": str(shared_data.parent), "OMP_NUM_THREADS": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # fmt: skip
    worker = None
    try:
        assert httpx.get(f"{api}/health", timeout=30).json() is True
        deployed = subprocess.run([str(BIN / "bertpipe"), "deploy", "--name", "tiny"], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deployment = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=30).json()
        assert deployment["work_pool_name"] == "bertpipe", deployment
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ], deployment["pull_steps"]
        worker_log = root / "worker.log"
        worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "bertpipe"], env, worker_log)
        yield Stack(root, api, env, worker, worker_log)
    finally:
        if worker is not None:
            stop(worker)
        leftovers = run_processes(root)
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(leftovers, timeout=10)


def deployment_run(
    stack: Stack, out: Path, overrides=None, watch=True
) -> tuple[str, subprocess.CompletedProcess]:
    """`prefect deployment run bert-pipeline/tiny --param out=...`: (flow run id, the finished command)."""
    args = ["deployment", "run", DEPLOYMENT, "--param", f"out={json.dumps(str(out))}"]
    if overrides:
        args += ["--param", f"overrides={json.dumps(overrides)}"]
    if watch:
        args += ["--watch", "--watch-interval", "3", "--watch-timeout", str(RUN_TIMEOUT_S)]
    done = stack.prefect(*args, timeout=RUN_TIMEOUT_S + 60)
    match = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert match, done.stdout + done.stderr
    return match.group(1), done


def artifacts(stack: Stack, flow_run_id: str) -> dict[str, dict]:
    found = stack.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a["key"]}


def task_states(stack: Stack, flow_run_id: str) -> dict[str, str]:
    runs = stack.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {r["name"]: r["state"]["name"] for r in runs}


def train_records(out: Path) -> list[dict]:
    path = out / "pretrain" / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            record = json.loads(line)
            if "loss" in record:
                records.append(record)
    return records


def test_cancelling_during_pretraining_leaves_no_process_and_the_next_run_resumes(stack):
    """Cancelled during pretraining, then run again: the second run resumes and completes, with its artifacts."""
    out = stack.root / "cancel"
    # A fixed schedule length: the second run may then stop at another max_steps on the same trajectory.
    schedule = ["pretrain.schedule_steps=20000", "pretrain.save_every=5"]
    flow_run_id, done = deployment_run(stack, out, ["pretrain.max_steps=20000", *schedule], watch=False)
    assert done.returncode == 0, done.stdout + done.stderr

    give_up = time.monotonic() + 480
    while len(train_records(out)) < 6:
        state = stack.state_type(flow_run_id)
        assert state not in TERMINAL, (
            f"run ended {state} before pretraining logged 6 steps" + stack.diagnosis(flow_run_id)
        )
        assert time.monotonic() < give_up, "pretraining did not log 6 steps in 480 s" + stack.diagnosis(
            flow_run_id
        )
        time.sleep(1)
    assert run_processes(out), "pretraining logs steps but no launcher or rank names the out directory"

    engine = [p for p in psutil.Process(stack.worker.pid).children() if p.is_running()]  # the flow run's
    cancelled_at = time.monotonic()
    cancel = stack.prefect("flow-run", "cancel", flow_run_id)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    # Until the run is final and its processes are gone (60 s more at most): when did each happen?
    state, final_s, gone_s, engine_s, give_up = None, None, None, None, time.monotonic() + 180
    while time.monotonic() < give_up and None in (final_s, gone_s, engine_s):
        elapsed = time.monotonic() - cancelled_at
        if final_s is None and (state := stack.state_type(flow_run_id)) in TERMINAL:
            final_s, give_up = elapsed, min(give_up, time.monotonic() + 60)
        if gone_s is None and not (alive := run_processes(out)):
            gone_s = elapsed
        if engine_s is None and not any(_alive(p) for p in engine):
            engine_s = elapsed
        time.sleep(0.25)
    print(f"\ncancel: flow run {state} after {final_s} s; flow-run process gone after {engine_s} s, "
          f"launcher and ranks after {gone_s} s")  # fmt: skip
    survivors = [(p.pid, " ".join(p.cmdline())[:200]) for p in alive if _alive(p)]
    assert not survivors, f"still running 60 s after the run ended: {survivors}" + stack.diagnosis(
        flow_run_id
    )
    assert engine_s is not None, "the flow run's process outlived the run by 60 s" + stack.diagnosis(
        flow_run_id
    )
    assert state == "CANCELLED", f"the cancelled run ended {state}" + stack.diagnosis(flow_run_id)

    latest = out / "pretrain" / "checkpoints" / "latest"
    assert latest.exists(), sorted(p.name for p in (out / "pretrain").rglob("*"))
    step = int(latest.read_text().strip().removeprefix("step-"))
    assert step >= 5, step
    before = [r for r in train_records(out) if r["step"] <= step]
    data_manifests = {
        n: (out / n / "manifest.json").stat().st_mtime_ns for n in ("corpus", "vocab", "examples")
    }

    started = time.monotonic()
    resumed_id, done = deployment_run(stack, out, [f"pretrain.max_steps={step + 3}", *schedule])
    print(f"resumed run: {time.monotonic() - started:.0f} s, from checkpoint step-{step}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + stack.diagnosis(resumed_id)
    assert stack.state_type(resumed_id) == "COMPLETED"

    after = train_records(out)
    assert after[: len(before)] == before, "the records up to the checkpoint were rewritten: not a resume"
    assert [r["step"] for r in after[len(before) :]] == [step + 1, step + 2, step + 3]
    assert f"resumed from step-{step}" in stack.logs(resumed_id)
    manifest = json.loads((out / "pretrain" / "manifest.json").read_text())
    assert manifest["stats"]["step"] == step + 3
    states = task_states(stack, resumed_id)
    assert all(states.get(s) == "Cached" for s in ("shard", "vocab", "examples")), states
    assert states.get("pretrain") == "Completed", states
    assert {n: (out / n / "manifest.json").stat().st_mtime_ns for n in data_manifests} == data_manifests
    assert not run_processes(out)

    # A completed run, as `prefect deployment run` leaves it: its parameters, artifacts and metrics.
    run = stack.flow_run(resumed_id)
    assert run["parameters"]["out"] == str(out) and run["parameters"]["config"] == "tiny"
    found = artifacts(stack, resumed_id)
    assert {"tiny-report", "tiny-evaluation", "tiny-figures", "pretraining-progress"} <= set(found), (
        found.keys()
    )
    report = found["tiny-report"]
    assert report["type"] == "markdown"
    assert "Pretraining" in report["data"] and "data:image/png;base64," in report["data"]
    assert found["tiny-evaluation"]["type"] == "table" and found["tiny-figures"]["type"] == "table"
    assert found["pretraining-progress"]["type"] == "progress"
    metrics = json.loads((out / "finetune-cola" / "metrics.json").read_text())
    assert metrics["task"] == "cola" and metrics["metric"] == "mcc", metrics


def test_the_retrain_deployment_deploys_with_its_schedule_off(stack):
    """`prefect deploy` accepts prefect.yaml's retrain schedule, and registers it inactive (nothing trains)."""
    deployed = subprocess.run([str(BIN / "bertpipe"), "deploy", "--name", "nightly"], env=stack.env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployment = stack.get("/deployments/name/bert-retrain/nightly")
    assert deployment["entrypoint"] == "flows/retrain.py:retrain", deployment
    [schedule] = deployment["schedules"]
    assert schedule["slug"] == "nightly-retrain" and schedule["active"] is False, schedule
    assert schedule["schedule"]["cron"] == "0 3 * * *", schedule
    runs = stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
    assert runs == [], runs  # an inactive schedule creates no runs
