"""Several nodes without ssh, one `bertpipe pretrain` per node as SLURM or Kubernetes start them: two "nodes"
over loopback sharing one run directory train exactly as one node with as many ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import reference
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[1]
BERTPIPE = Path(sys.executable).parent / "bertpipe"


@pytest.fixture(scope="module")
def stage(training_stage) -> tuple[Path, Path]:
    return training_stage


@pytest.fixture
def start():
    """Start `bertpipe ARGS`; whatever still runs when the test ends gets SIGTERM (its launch stops its ranks),
    then SIGKILL: a node whose partner failed would wait at the rendezvous for DEEPSPEED_TIMEOUT (10 min)."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores
        started.append(subprocess.Popen([str(BERTPIPE), *args], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))  # fmt: skip
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def finish(process: subprocess.Popen) -> str:
    """Its stdout once it exited 0 (else the test fails with the end of its output)."""
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the timings (which differ from run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k not in reference.TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_of_one_rank_train_exactly_as_one_node_of_two_ranks(
    stage, reference_run, start, tmp_path: Path
):
    common = [*reference.reference_args(stage), "--max-steps", str(reference.STEPS)]
    one, two = reference_run.out, tmp_path / "two"

    # Node 1 first: its launcher waits at the rendezvous for node 0's, which must not trip over its lock.
    nodes = [
        "--nnodes",
        "2",
        "--num-gpus",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    node1 = start(*common, "--out", str(two), *nodes, "--node-rank", "1")
    node0 = start(*common, "--out", str(two), *nodes, "--node-rank", "0")
    assert f"stopped at step {reference.STEPS} (max_steps)" in finish(node0)
    assert "node 1: its ranks are done; node 0 reports the run" in finish(node1)

    # Same world, same ranks, same gloo reductions: the same numbers, not merely close ones.
    assert records(two) == records(one)
    steps = [r["step"] for r in records(two)]
    assert steps == [*range(1, reference.STEPS + 1), reference.STEPS]  # every step, then the final evaluation
    for r in (0, 1):
        assert (two / f"data_log/rank{r}.jsonl").read_text() == (one / f"data_log/rank{r}.jsonl").read_text()
    # Node 0 ran the stage: its launch config and the manifest; node 1 wrote nothing there but its ranks' files.
    assert json.loads((two / "manifest.json").read_text())["stats"]["step"] == reference.STEPS
    assert sorted(p.name for p in two.glob("launch_config*")) == ["launch_config.json"]
    assert {p.name for p in (two / f"checkpoints/step-{reference.STEPS}").glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }


def refused(*args: str, contains: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert contains in result.output and "Traceback" not in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_nonsense_node_flags_are_one_line_errors_before_any_work(stage, tmp_path: Path):
    examples, _ = stage
    out = tmp_path / "run"
    common = ["pretrain", "--examples", str(examples), "--out", str(out), "--max-steps", "2"]
    refused(*common, "--nnodes", "2", "--node-rank", "2", "--master-addr", "h",
            contains="--node-rank must be from 0 to --nnodes - 1 = 1, got 2")  # fmt: skip
    refused(*common, "--node-rank", "1", contains="--node-rank must be from 0 to --nnodes - 1 = 0")
    refused(*common, "--nnodes", "2", "--node-rank", "0", contains="--nnodes 2 needs --master-addr")
    refused(*common, "--nnodes", "0", contains="--nnodes must be at least 1")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    refused(*common, "--hostfile", str(hostfile), "--nnodes", "2", "--master-addr", "h",
            contains="give one or the other")  # fmt: skip
    refused(*common, "--nnodes", "2", "--master-addr", "h", "--master-port", "0",
            contains="--master-port must be from 1 to 65535")  # fmt: skip
    assert not out.exists() and not (tmp_path / ".run.lock").exists()


def test_a_node_other_than_node_0_refuses_what_node_0_refuses_without_taking_the_lock(stage, tmp_path: Path):
    from bert.pretrain.config import TrainConfig
    from bert.pretrain.launch import Nodes
    from bert.pretrain.stage import follow, run_pretrain_stage, stage_config, stage_inputs, trajectory
    from data_prep.manifest import INPROGRESS, StageError, write_json_atomic

    examples, model_config = stage
    out = tmp_path / "run"
    config = TrainConfig(examples=str(examples), out=str(out), model_config=str(model_config), max_steps=2)
    # Before any checkpoint: node 1's ranks resume from whatever node 0 leaves there, unless told not to.
    assert follow(config, resume=None)[0].resume and follow(config, resume=True)[0].resume
    assert not follow(config, resume=False)[0].resume
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/latest").write_text("step-1")
    node1 = Nodes(num_nodes=2, node_rank=1, master_addr="127.0.0.1")
    with pytest.raises(StageError, match="checkpoints of a run with other settings"):
        run_pretrain_stage(config, num_gpus=1, resume=True, nodes=node1)  # no .inprogress.json: not this run
    values, inputs = stage_config(config), stage_inputs(config)  # as node 0's prepare records this run
    write_json_atomic(out / INPROGRESS, {"trajectory": trajectory(values, inputs), "config": values})
    with pytest.raises(StageError, match="already holds checkpoints: pass --resume"):
        run_pretrain_stage(config, num_gpus=1, resume=False, nodes=node1)
    assert follow(config, resume=True)[0].resume
    assert not (tmp_path / ".run.lock").exists()  # the lock is node 0's
