"""A stand-in for the `deepspeed` launcher and one rank, for testing bert.pretrain.launch's process handling.

Run as the launcher (``python fake_launcher.py ... --module bert.pretrain --config FILE``) it starts one "rank"
(``python -u fake_launcher.py --as-rank -m bert.pretrain --config FILE``: the command line launch's rank finder
looks for) and, like DeepSpeed's single-node runner, does not forward SIGTERM: it dies of it and leaves the rank.
The rank keeps the contract of the real one that the parent side reads, in a fraction of a second instead of the
real ranks' 10-20 s of start-up: a line per step on stdout (``[rank 0] ...``), a record per step in
``OUT/metrics.jsonl``, ``checkpoints/step-N/bertpipe_state.json`` + ``checkpoints/latest`` and ``result.json`` on
stopping (at max_steps, on SIGTERM, or when the process in BERTPIPE_PARENT_PID is gone), resume from ``latest``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STEP_S = 0.05  # a "step": quick, yet several of them between two of launch's polls (0.2 s)


def rank(config_file: Path) -> int:
    config = json.loads(config_file.read_text())
    out = Path(config["out"])
    stop = {"reason": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(reason="sigterm"))
    parent = int(os.environ.get("BERTPIPE_PARENT_PID") or 0)
    checkpoints = out / "checkpoints"
    step = 0
    if config.get("resume") and (checkpoints / "latest").exists():
        tag = (checkpoints / "latest").read_text().strip()
        step = int(tag.removeprefix("step-"))
        print(f"[rank 0] resumed from {tag} at step {step}", flush=True)
    max_steps = config.get("max_steps")
    while stop["reason"] is None:
        if max_steps is not None and step >= max_steps:
            stop["reason"] = "max_steps"
            break
        if parent and not _alive(parent):
            stop["reason"] = "sigterm"
            break
        time.sleep(STEP_S)
        step += 1
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
        try:
            print(f"[rank 0] step {step}", flush=True)
        except BrokenPipeError:  # the reader is gone (its process was killed): train on, stop as told
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    (checkpoints / f"step-{step}").mkdir(parents=True, exist_ok=True)
    (checkpoints / f"step-{step}" / "bertpipe_state.json").write_text(json.dumps({"step": step}))
    (checkpoints / "latest").write_text(f"step-{step}")
    result = {"out": str(out), "step": step, "stop_reason": stop["reason"], "device": "cpu"}
    (out / "result.json").write_text(json.dumps(result))
    with contextlib.suppress(BrokenPipeError):
        print(f"[rank 0] stopped at step {step} ({stop['reason']})", flush=True)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def launcher(config_file: Path) -> int:
    child = subprocess.Popen([sys.executable, "-u", __file__, "--as-rank", "-m", "bert.pretrain", "--config",
                              str(config_file)])  # fmt: skip
    return child.wait()


if __name__ == "__main__":
    config_file = Path(sys.argv[sys.argv.index("--config") + 1])
    sys.exit(rank(config_file) if "--as-rank" in sys.argv else launcher(config_file))
