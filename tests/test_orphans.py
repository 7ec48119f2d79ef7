"""What kills leave behind, cleaned up or named by the next launch: DeepSpeed's /dev/shm all-reduce buffers whose
ranks are gone, a JIT build lock whose builder is gone, and Prefect's embedded server after a kill -9 of
`bertpipe run`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import stage, tiny_config  # noqa: F401  (stage is a fixture)

from bert.pretrain import ds_config, launch

BERTPIPE = Path(sys.executable).parent / "bertpipe"

BUFFER_BYTES = 4096
MAPPER = """
import mmap, sys, time
with open(sys.argv[1], "r+b") as f:
    view = mmap.mmap(f.fileno(), 0)
print("mapped", flush=True)
time.sleep(120)
"""


def buffer(directory: Path, port: int, rank: int, uid: int | None = None) -> Path:
    """A fake all-reduce buffer named as DeepSpeed's shm op names them."""
    path = (
        directory
        / f"deepspeed_allreduce_buffer_{os.getuid() if uid is None else uid}_127.0.0.1_{port}_{rank}"
    )
    path.write_bytes(b"\0" * BUFFER_BYTES)
    return path


@pytest.fixture
def shm(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(ds_config, "SHM_BUFFERS", tmp_path)
    return tmp_path


def test_sweep_removes_orphaned_buffers_and_keeps_one_a_live_process_maps(shm, caplog):
    orphans = [buffer(shm, 29501, 0), buffer(shm, 29501, 1), buffer(shm, 29502, 0)]
    in_use = buffer(shm, 29600, 0)
    # Another user's: not ours to judge, since that user's processes' maps are unreadable.
    other_user = buffer(shm, 29501, 0, uid=os.getuid() + 1)
    unrelated = shm / "some_other_segment"
    unrelated.write_bytes(b"x")
    mapper = subprocess.Popen([sys.executable, "-c", MAPPER, str(in_use)], stdout=subprocess.PIPE, text=True)
    try:
        assert mapper.stdout.readline().strip() == "mapped"  # waits on the mapping itself
        with caplog.at_level(logging.INFO, logger="bert.pretrain.launch"):
            launch.sweep_shm_buffers()
        assert not any(p.exists() for p in orphans)
        assert in_use.exists(), "a buffer a live process maps was deleted"
        assert other_user.exists() and unrelated.exists()
        lines = [r.getMessage() for r in caplog.records if "all-reduce buffer" in r.getMessage()]
        assert lines == [
            f"removed 3 DeepSpeed all-reduce buffers left in {shm} by killed ranks (12.0 KiB freed)"
        ]
    finally:
        mapper.kill()
        mapper.wait()
    assert ds_config.sweep_shm_buffers() == (1, BUFFER_BYTES)  # its owner gone, it goes too
    assert not in_use.exists()


def test_sweep_keeps_a_buffer_held_open_but_not_yet_mapped(shm):
    """A rank between shm_open and mmap holds only a descriptor: still in use."""
    held = buffer(shm, 29700, 0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'rb'); print('open', flush=True); "
         "time.sleep(120)", str(held)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        assert ds_config.sweep_shm_buffers() == (0, 0)
        assert held.exists()
    finally:
        holder.kill()
        holder.wait()


def test_sweep_says_nothing_when_nothing_is_left(shm, caplog):
    with caplog.at_level(logging.INFO, logger="bert.pretrain.launch"):
        launch.sweep_shm_buffers()
    assert not [r for r in caplog.records if "all-reduce" in r.getMessage()]


# --- the JIT build lock ---------------------------------------------------------------------------------


def old_lock(root: Path, op: str = "deepspeed_shm_comm", age_s: float = 3600) -> Path:
    """A lock as torch's FileBaton leaves it when its build is killed, ``age_s`` old."""
    (root / op).mkdir(parents=True, exist_ok=True)
    lock = root / op / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


@pytest.fixture
def extensions(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "torch_extensions"
    root.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def test_extensions_root_is_where_torch_builds(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch creates the directory: not in the real cache

    assert launch.torch_extensions_root() / "deepspeed_shm_comm" == Path(
        _get_build_directory("deepspeed_shm_comm", verbose=False)
    )


def test_an_old_lock_nobody_holds_is_named_with_the_command_that_removes_it(extensions):
    lock = old_lock(extensions)
    assert launch.torch_extensions_root() == extensions
    with pytest.raises(ValueError) as raised:
        launch.check_extension_locks()
    message = str(raised.value)
    assert "\n" not in message and message.endswith(f"rm {lock}") and "60 min old" in message
    assert lock.exists(), "not ours to delete: a build elsewhere may hold it"


def test_a_fresh_lock_or_one_a_live_builder_holds_is_not_stale(extensions):
    fresh = old_lock(extensions, "fresh_op", age_s=5)  # a build that began seconds ago
    held = old_lock(extensions, "held_op")
    builder = subprocess.Popen(
        [sys.executable, "-c", "import time; f = open('lock', 'rb'); print('building', flush=True); time.sleep(120)"],
        cwd=held.parent, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert builder.stdout.readline().strip() == "building"
        assert launch.stale_extension_locks() == []
        launch.check_extension_locks()  # no error
    finally:
        builder.kill()
        builder.wait()
    assert launch.stale_extension_locks() == [held]  # its builder gone: stale
    assert fresh.exists()


def test_a_compiler_working_in_the_build_directory_keeps_the_lock(extensions):
    """ninja and the compiler run with the build directory as their working directory, the lock not open."""
    lock = old_lock(extensions)
    compiler = subprocess.Popen(
        [sys.executable, "-c", "import time; print('compiling', flush=True); time.sleep(120)"],
        cwd=lock.parent, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert compiler.stdout.readline().strip() == "compiling"
        assert launch.stale_extension_locks() == []
    finally:
        compiler.kill()
        compiler.wait()


def test_launch_refuses_before_anything_starts_while_a_stale_lock_waits(extensions, stage, tmp_path):  # noqa: F811
    lock = old_lock(extensions)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"rm {lock}$"):
        launch.launch(tiny_config(stage, out, max_steps=1))
    assert not out.exists()


# --- Prefect's embedded server --------------------------------------------------------------------------


def embedded_servers(pid: int) -> list:
    import psutil

    from flows.cli import _is_embedded_server

    with contextlib.suppress(psutil.Error):
        return [c for c in psutil.Process(pid).children() if _is_embedded_server(c)]
    return []


@pytest.mark.slow
def test_embedded_server_dies_with_a_killed_bertpipe_run(shared_data, tmp_path):
    import psutil

    preset = tmp_path / "shard-only.json"
    preset.write_text(json.dumps({"name": "shard-only", "corpus": [str(shared_data / "corpus/inaugural")],
                                  "shard": {"num_shards": 2, "doc_boundary": "file"}}))  # fmt: skip
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # the embedded server, as on a laptop
    command = [str(BERTPIPE), "run", "--config", str(preset), "--stages", "shard", "--out", str(tmp_path / "run"),
               "--shared", str(shared_data.parent)]  # fmt: skip
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list = []
    try:
        deadline = time.monotonic() + 180  # a ceiling only: the server is up in 9-14 s (PREFECT_NOTES)
        while not servers and run.poll() is None and time.monotonic() < deadline:
            servers = embedded_servers(run.pid)
            time.sleep(0.2)
        assert servers, f"no embedded Prefect server appeared (bertpipe run exited {run.returncode})"
        run.kill()
        run.wait()
        _, alive = psutil.wait_procs(servers, timeout=60)  # returns as soon as they are gone
        assert not alive, "Prefect's embedded server outlived a kill -9 of bertpipe run"
    finally:
        run.kill()
        run.wait()
        for server in servers:
            with contextlib.suppress(psutil.Error):
                server.kill()


def test_bertpipe_run_refuses_a_stale_lock_before_prefect_starts(extensions, shared_data, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    lock = old_lock(extensions)
    from test_flow import tiny_pipeline

    preset = tiny_pipeline(shared_data, tmp_path / "tiny.json")
    result = CliRunner().invoke(app, ["run", "--config", str(preset), "--out", str(tmp_path / "run"),
                                      "--shared", str(shared_data.parent)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"rm {lock}" in result.output
    assert not (tmp_path / "run").exists()
