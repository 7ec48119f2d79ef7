"""Stage directories and their manifest.json: fingerprints, atomic commits, skip-when-complete, verification.

A stage writes into its own directory and finishes by writing ``manifest.json`` last, atomically. A
directory without a complete manifest is unfinished and never read downstream. While a stage runs, a
small ``.inprogress.json`` records the fingerprint being built, so a re-run with the same fingerprint may
keep the part files that were already committed (each part file is itself written atomically) and a
re-run with another fingerprint starts from an empty directory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa  # imported where used: reading a manifest needs no pyarrow

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INPROGRESS = ".inprogress.json"
TABLE_SUFFIXES = (".parquet", ".arrow")
# Vocabularies, tokenizers and configs: small, and one changed byte shifts every id, so their sha256 is checked
# on every read; data files (tables, weights) have their size and rows checked, their sha256 on request.
SMALL_FILE_SUFFIXES = (".txt", ".json")
# An Arrow IPC file starts with these bytes; an IPC stream starts with a message (0xFFFFFFFF, then its length).
ARROW_FILE_MAGIC = b"ARROW1"
TEMPORARY_GLOB = ".*.tmp"  # how atomic_path (and the stages' temporary directories) name work in progress
_UMASK_LOCK = threading.Lock()


class StageError(ValueError):
    """A user-facing problem with a stage directory or its inputs; the message says what to do."""


def bertpipe_version() -> str:
    try:
        from importlib.metadata import version

        return version("bertpipe")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (dict keys sorted)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def stage_fingerprint(stage: str, config: dict, inputs: dict[str, str], format_version: int) -> str:
    """The fingerprint of a stage run: its config, its inputs' fingerprints and the format version."""
    return fingerprint({"stage": stage, "config": config, "inputs": inputs, "format_version": format_version})


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process umask, read from /proc on Linux so that it never changes, even for a moment."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and set it back; 0o022 (not 0) as the stand-in keeps a file that
    # another thread creates meanwhile from being world-writable, and the lock keeps our own readers apart.
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask (0o644 under 022)."""
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    """The mode a plain ``mkdir()`` would give a new directory under the current umask (0o755 under 022)."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched, so no reader ever sees a
    half-written file. The file gets the mode the umask says (mkstemp's 0o600 would hide it from the
    teammates who share the storage).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through atomic_path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through atomic_path."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def remove_temporaries(directory: str | os.PathLike) -> None:
    """Delete the temporary files and directories (``.*.tmp``) a killed run left below ``directory``."""
    for leftover in sorted(Path(directory).rglob(TEMPORARY_GLOB)):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def open_arrow_ipc(source: pa.NativeFile) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and (lazily) the record batches of the Arrow IPC stream or IPC file on ``source``.

    On a memory map no data is copied: the batches' buffers are slices of the map. Example shards are IPC
    streams (what ``datasets.Dataset.from_file`` reads); older example shards and the token cache are IPC
    files, told apart by their first bytes.
    """
    import pyarrow as pa

    is_file = source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
    source.seek(0)
    if is_file:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    reader = pa.ipc.open_stream(source)
    return reader.schema, iter(reader)


def count_rows(path: str | os.PathLike) -> int:
    """Rows of a Parquet file (from its footer) or an Arrow IPC stream or file (from its batch headers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(path)
    try:
        if path.endswith(".parquet"):
            return pq.ParquetFile(path).metadata.num_rows
        if path.endswith(".arrow"):
            with pa.memory_map(path) as source:
                _, batches = open_arrow_ipc(source)
                return sum(batch.num_rows for batch in batches)
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:
        raise StageError(
            f"{path} is not a readable {Path(path).suffix[1:]} file (truncated or damaged: {e}); "
            "re-run the stage that wrote it"
        ) from None
    raise StageError(f"cannot count rows of {path}: only .parquet and .arrow files are known")


def file_entry(
    stage_dir: str | os.PathLike, relpath: str, rows: int | None = None, sha256: bool = True
) -> dict:
    """The manifest entry of one output file: path relative to the stage directory, rows, bytes, sha256."""
    full = Path(stage_dir) / relpath
    if rows is None and full.suffix in TABLE_SUFFIXES:
        rows = count_rows(full)  # a vocab.txt or JSON side file has no rows (verify() skips None)
    return {
        "path": relpath,
        "rows": None if rows is None else int(rows),
        "bytes": full.stat().st_size,
        "sha256": sha256_file(full) if sha256 else None,
    }


@dataclass
class Stage:
    """A stage directory being built: where its files go and whether it was already complete."""

    directory: Path
    stage: str
    fingerprint: str
    config: dict
    inputs: dict[str, str]
    format_version: int
    complete: bool

    def path(self, relpath: str) -> Path:
        return self.directory / relpath

    def commit(self, files: list[dict], stats: dict, extra: dict | None = None) -> dict:
        """Write manifest.json last and atomically; the directory is complete from this moment on.

        ``extra`` adds top-level keys that are not part of the fingerprint (e.g. the examples' vocab_dir).
        """
        manifest = {
            "stage": self.stage,
            "format_version": self.format_version,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "inputs": self.inputs,
            **(extra or {}),
            "files": sorted(files, key=lambda f: f["path"]),
            "stats": stats,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bertpipe_version": bertpipe_version(),
        }
        remove_temporaries(self.directory)  # a finished directory holds no work in progress
        write_json_atomic(self.directory / MANIFEST, manifest)
        (self.directory / INPROGRESS).unlink(missing_ok=True)
        self.complete = True
        release_writer_lock(self.directory)
        return manifest


def check_output_directory(directory: str | os.PathLike) -> None:
    """StageError when ``directory`` cannot be a directory: it is a file, or lies under one."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise StageError(f"output path {directory} exists and is not a directory: choose another --out")
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StageError(
                    f"output path {directory} lies under {parent}, which is a file: choose another --out"
                )
            return


_HELD_LOCKS: dict[str, int] = {}  # lock file → the descriptor this process holds it with


def _lock_path(directory: Path) -> Path:
    # Beside the directory, not in it: clearing a directory for a rebuild must not drop its lock.
    return directory.parent / f".{directory.name}.lock"


def acquire_writer_lock(directory: str | os.PathLike) -> None:
    """Make this process the one writer of ``directory``, or raise StageError naming the holder.

    An exclusive ``flock`` on ``.<name>.lock`` beside the directory, held until ``release_writer_lock`` or
    the process ends: the kernel drops the lock of a dead process, so a stale lock is simply taken over.
    A process that holds it already (a retry in the same process) keeps it.
    """
    import fcntl
    import socket

    directory = Path(directory)
    path = _lock_path(directory)
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_json(path) or {}
        os.close(fd)
        raise StageError(
            f"{directory} is being written by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(since {holder.get('since', '?')}): wait for that run to finish or stop it first"
        ) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    _HELD_LOCKS[key] = fd


def release_writer_lock(directory: str | os.PathLike) -> None:
    """Give up this process's writer lock on ``directory`` (nothing when it holds none)."""
    import fcntl

    fd = _HELD_LOCKS.pop(str(_lock_path(Path(directory)).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def clear_directory(directory: Path) -> None:
    """Empty a stage directory for a rebuild; the manifest goes first, so an interruption here never leaves a
    stale-but-complete directory."""
    (directory / MANIFEST).unlink(missing_ok=True)
    for child in directory.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def begin_stage(
    directory: str | os.PathLike,
    stage: str,
    config: dict,
    inputs: dict[str, str],
    format_version: int,
    force: bool = False,
) -> Stage:
    """Open ``directory`` for a stage run.

    Returns a Stage with ``complete=True`` when a finished run with the same fingerprint is already there
    (the caller does nothing). Otherwise the directory is made ready: a finished run with another
    fingerprint, or an unfinished one for another fingerprint, is cleared; an unfinished run for the same
    fingerprint is kept so its committed part files can be reused, less the temporary files a kill left.
    """
    directory = Path(directory)
    fp = stage_fingerprint(stage, config, inputs, format_version)
    check_output_directory(directory)
    rebuild = lambda e: log.warning("%s; building %s again", e, directory)  # noqa: E731
    if not force and complete_manifest(directory, stage, fp, on_mismatch=rebuild) is not None:
        return Stage(directory, stage, fp, config, inputs, format_version, complete=True)
    manifest = read_manifest(directory)
    if manifest is not None and manifest.get("stage") != stage:
        raise StageError(
            f"{directory} holds a finished '{manifest.get('stage')}' stage, not '{stage}': "
            "choose another --out rather than overwrite it"
        )
    acquire_writer_lock(directory)  # before anything is cleared or written; released by commit
    inprogress = read_json(directory / INPROGRESS)
    resumable = inprogress is not None and inprogress.get("fingerprint") == fp and not force
    if directory.exists() and not resumable:
        if any(directory.iterdir()) and manifest is None and inprogress is None:
            raise StageError(
                f"{directory} is not empty and is not a bertpipe stage directory: "
                "choose an empty or new --out directory"
            )
        clear_directory(directory)
    if directory.exists() and resumable:
        remove_temporaries(directory)  # a kill mid-write leaves one; committed parts are kept
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / INPROGRESS, {"stage": stage, "fingerprint": fp})
    return Stage(directory, stage, fp, config, inputs, format_version, complete=False)


def read_json(path: Path) -> dict | None:
    """A small JSON file (manifest, marker, lock record), or None when it is missing or unreadable as JSON."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a complete stage directory, or None when there is none (unfinished or empty)."""
    manifest = read_json(Path(directory) / MANIFEST)
    if manifest is None or "fingerprint" not in manifest or "files" not in manifest:
        return None
    return manifest


def complete_manifest(
    directory: str | os.PathLike,
    stage: str,
    fingerprint: str | None = None,
    on_mismatch: Callable[[Exception], None] | None = None,
) -> dict | None:
    """The manifest of ``directory`` when it holds a finished ``stage`` (with ``fingerprint``, when given) whose
    files match it; None when the stage has to run.

    The files are checked as a reader checks them (sizes, rows, small files' sha256), so "re-run the stage"
    mends whatever a reader would refuse. ``on_mismatch`` is called with the error when the manifest is the one
    asked for but its files do not match it (to log it, or to mark the directory unfinished).
    """
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("stage") != stage:
        return None
    if fingerprint is not None and manifest["fingerprint"] != fingerprint:
        return None
    try:
        verify(directory, manifest)
    except (StageError, OSError, ValueError) as e:  # a file missing, resized, truncated or unreadable
        if on_mismatch is not None:
            on_mismatch(e)
        return None
    return manifest


def require_complete(directory: str | os.PathLike, stage: str, verify_rows: bool = True) -> dict:
    """The manifest of a finished ``stage`` directory, or a StageError that says what to run."""
    directory = Path(directory)
    if not directory.exists():
        raise StageError(f"{directory} does not exist: run `bertpipe {stage}` with --out {directory} first")
    if not directory.is_dir():
        raise StageError(
            f"{directory} is a file, not a '{stage}' stage directory: give the directory `bertpipe {stage}` wrote"
        )
    manifest = read_manifest(directory)
    if manifest is None:
        raise StageError(
            f"{directory} is not a finished '{stage}' directory (no complete manifest.json): "
            f"run `bertpipe {stage}` to finish it"
        )
    if manifest.get("stage") != stage:
        raise StageError(
            f"{directory} holds a '{manifest.get('stage')}' stage, but a '{stage}' one is needed"
        )
    if verify_rows:
        verify(directory, manifest, check_sha256=False)
    return manifest


def changed_file_error(
    path: str | os.PathLike, stage: str, what: str, stage_dir: str | os.PathLike | None = None
) -> StageError:
    """The one-line error for a file that no longer matches the manifest of the ``stage`` that wrote it.

    ``stage_dir``: given when only a sha256 over a data file shows the change. A re-run of a complete stage
    checks sizes, rows and small files only, so it would not notice: the directory has to go first.
    """
    rerun = (
        f"re-run bertpipe {stage}" if stage_dir is None else f"delete {stage_dir} and re-run bertpipe {stage}"
    )
    return StageError(
        f"{path} does not match its manifest ({what}): the file was changed after the {stage} stage wrote it; "
        f"{rerun}"
    )


def verify(
    directory: str | os.PathLike,
    manifest: dict | None = None,
    check_sha256: bool = False,
    under: str | None = None,
) -> None:
    """Check the files of a manifest: each exists with its recorded size and rows, each small file (vocabulary,
    tokenizer, config) has its recorded sha256, and with ``check_sha256`` every file does.

    ``under``: only the files at or below this relative path. A StageError names the file and the stage to
    re-run.
    """
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    if manifest is None:
        raise StageError(f"{directory} has no complete manifest.json: run the stage that writes it")
    stage = str(manifest.get("stage", "that wrote it"))
    for entry in manifest["files"]:
        relpath = entry["path"]
        if under and not (relpath == under or relpath.startswith(under.rstrip("/") + "/")):
            continue
        full = directory / relpath
        if not full.is_file():
            raise StageError(
                f"{full} is listed in {directory / MANIFEST} but missing: re-run bertpipe {stage}"
            )
        if entry.get("rows") is not None and full.suffix in TABLE_SUFFIXES:
            rows = count_rows(full)
            if rows != entry["rows"]:
                raise StageError(
                    f"{full} has {rows} rows but its manifest says {entry['rows']}: the file was changed "
                    f"after the {stage} stage wrote it; re-run bertpipe {stage}"
                )
        size = full.stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            raise changed_file_error(full, stage, f"{size} bytes, not {entry['bytes']}")
        small = full.suffix in SMALL_FILE_SUFFIXES
        if entry.get("sha256") and (check_sha256 or small) and sha256_file(full) != entry["sha256"]:
            raise changed_file_error(full, stage, "sha256 differs", None if small else directory)


def verify_source(path: str | os.PathLike) -> None:
    """Check what a stage manifest promises about ``path``: a stage directory, a file it lists, or a folder
    in one (the examples' ``vocab/``). Nothing when no manifest covers it (a vocabulary from elsewhere)."""
    path = Path(path).absolute()
    for directory in (path, *list(path.parents)[:2]):
        manifest = read_manifest(directory) if directory.is_dir() else None
        if manifest is None:
            continue
        under = None if directory == path else path.relative_to(directory).as_posix()
        verify(directory, manifest, under=under)
        return


def find_stage_directories(root: str | os.PathLike) -> list[Path]:
    """``root`` when it is a stage directory (finished or not), else its subdirectories that are (a run root)."""
    root = Path(root)

    def is_stage(directory: Path) -> bool:
        return (directory / MANIFEST).is_file() or (directory / INPROGRESS).is_file()

    if is_stage(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and is_stage(d))


def invalidate(directory: str | os.PathLike) -> None:
    """Mark a complete stage directory whose files no longer match its manifest as unfinished.

    The next ``begin_stage`` then clears and rebuilds it (an unfinished run of another fingerprint),
    instead of trusting the manifest or refusing the directory as foreign.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return
    write_json_atomic(directory / INPROGRESS, {"stage": manifest.get("stage"), "fingerprint": None})
    (directory / MANIFEST).unlink(missing_ok=True)


# --- a full disk ------------------------------------------------------------------------------------------------

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_FREE_BYTES = (
    64 * 2**20
)  # less than this free under a run's directory: a write that failed there ran out of space


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def disk_full_error(error: BaseException) -> BaseException | None:
    """The exception of ``error``'s chain that says the disk (or the user's quota) is full, else None. Libraries
    that wrap the OS error keep only its text (tokenizers: "No space left on device (os error 28)")."""
    texts = [os.strerror(code) for code in DISK_FULL_ERRNOS]
    for e in error_chain(error):
        if (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or any(t in str(e) for t in texts):
            return e
    return None


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent); None when unknown."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None


def format_bytes(num_bytes: float) -> str:
    """``num_bytes`` for a person: 0 bytes, 12.3 MiB, 4.0 GiB."""
    for unit in ("bytes", "KiB", "MiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"
