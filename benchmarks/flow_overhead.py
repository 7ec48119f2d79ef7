"""What orchestration costs: the Prefect flow against calling the stage functions directly, and a re-run.

Three runs of one pipeline preset, each a fresh process (as a user runs them):
1. ``direct``: the stage functions called in order without Prefect (same typed configs, a fresh directory);
2. ``flow``: ``bertpipe run`` (the flow on Prefect's embedded ephemeral server), a fresh directory;
3. ``rerun``: ``bertpipe run`` again on the directory of 2, every stage cached;
4. ``rerun_with_server``: the same against a running ``prefect server`` (PREFECT_API_URL), started here.
Reports wall seconds of each, the flow's overhead over direct calls, the re-run as a share of the first run,
and how much of the re-run is Prefect's start-up (ephemeral server + engine: process start to the flow's
first log line) and how much is the cached flow itself. Prints one JSON object. Not a test: the machine is
shared and noisy; read it with the load that it reports.

    python benchmarks/flow_overhead.py [--config demo] [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BERTPIPE_SHARED", REPO.parent / "shared"))
BERTPIPE = str(Path(sys.executable).parent / "bertpipe")
DIRECT = """
import sys
from pathlib import Path
from flows.config import build_stage_configs, load_pipeline_config
from data_prep import examples_stage, shard, vocab
from bert import finetune
from bert.pretrain import stage as pretrain_stage
config = load_pipeline_config(sys.argv[1])
c = build_stage_configs(config, Path(sys.argv[2]) / "data", Path(sys.argv[3]))
shard.shard_corpus(c.shard)
vocab.train_vocab(c.vocab)
examples_stage.generate_examples(c.examples)
if c.pretrain is not None:
    pretrain_stage.run_pretrain_stage(c.pretrain, num_gpus=c.num_gpus, hostfile=c.hostfile)
for task in c.finetune:
    finetune.main(task)
"""


def timed(command: list[str], **extra_env: str) -> tuple[float, str, float]:
    """(wall seconds, combined output, the wall-clock start) of a command that must succeed."""
    env = {
        **os.environ,
        **extra_env,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "BERTPIPE_SHARED": str(SHARED),
    }
    started_wall, started = time.time(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return seconds, done.stdout + done.stderr, started_wall


def seconds_to_flow_start(output: str, started_wall: float) -> float | None:
    """Process start → the flow's "Beginning flow run" line (Prefect's console timestamps are HH:MM:SS.mmm)."""
    match = re.search(
        r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| Flow run '[^']+' - Beginning flow run", output, re.M
    )
    if match is None:
        return None
    day = datetime.fromtimestamp(started_wall)
    clock = datetime.strptime(match.group(1), "%H:%M:%S.%f").time()
    return round(datetime.combine(day.date(), clock).timestamp() - started_wall, 2)


def flow_command(config: str, out: Path) -> list[str]:
    """`bertpipe run` of ``config`` into ``out`` (the same command for the first run and the re-runs)."""
    return [BERTPIPE, "run", "--config", config, "--out", str(out), "--shared", str(SHARED)]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A `prefect server` on a free loopback port with its own home; (process, API URL) once healthy."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.read().strip() == b"true":
                    return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("prefect server did not become healthy in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="pipeline preset")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved direct/flow pairs (medians)")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bertpipe-flow-bench-"))
    load = os.getloadavg()
    direct, first, rerun, rerun_startup, first_startup, with_server, server_startup = ([] for _ in range(7))
    for r in range(args.repeats):  # interleaved, so that a change of load hits both sides alike
        seconds, _, _ = timed(
            [sys.executable, "-c", DIRECT, args.config, str(SHARED), str(work / f"direct-{r}")]
        )
        direct.append(seconds)
        run = flow_command(args.config, work / f"flow-{r}")
        seconds, output, started = timed(run)
        first.append(seconds)
        first_startup.append(seconds_to_flow_start(output, started))
        seconds, output, started = timed(run)
        rerun.append(seconds)
        rerun_startup.append(seconds_to_flow_start(output, started))
        summary = json.loads((work / f"flow-{r}" / "pipeline_summary.json").read_text())
        assert all(summary["cached"].values()), f"the re-run was not fully cached: {summary['cached']}"
    server, url = start_server(work / "prefect-home")
    try:
        for r in range(args.repeats):
            run = flow_command(args.config, work / f"flow-{r}")
            seconds, output, started = timed(
                run, PREFECT_API_URL=url, PREFECT_HOME=str(work / "prefect-home")
            )
            with_server.append(seconds)
            server_startup.append(seconds_to_flow_start(output, started))
    finally:
        server.terminate()
        server.wait(timeout=60)
    median = statistics.median
    result = {
        "config": args.config,
        "repeats": args.repeats,
        "direct_s": [round(x, 1) for x in direct],
        "flow_first_run_s": [round(x, 1) for x in first],
        "flow_overhead_s_median": round(median(f - d for f, d in zip(first, direct, strict=True)), 1),
        "rerun_s": [round(x, 1) for x in rerun],
        "rerun_share_of_first_run_median": round(median(r / f for r, f in zip(rerun, first, strict=True)), 4),
        "rerun_prefect_startup_s": rerun_startup,
        "first_run_prefect_startup_s": first_startup,
        "rerun_stage_tasks_s": round(sum(summary["timings_s"].values()), 2),
        "rerun_with_server_s": [round(x, 1) for x in with_server],
        "rerun_with_server_share_of_first_run_median": round(median(with_server) / median(first), 4),
        "rerun_with_server_startup_s": server_startup,
        "loadavg_before": [round(x, 2) for x in load],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "work": str(work),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
