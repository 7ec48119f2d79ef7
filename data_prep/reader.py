"""Reading example shards written by the examples stage (after verifying the stage's manifest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from data_prep.manifest import StageError, open_arrow_ipc, require_complete, verify
from data_prep.schema import ExampleMetadata


def example_files(directory: str | Path, split: str = "train", check_sha256: bool = False) -> list[Path]:
    """The example files of ``split`` listed in a finished examples directory, in name order.

    Raises StageError when the directory is unfinished or a file's rows (or sha256) differ from the manifest.
    """
    directory = Path(directory)
    manifest = require_complete(directory, "examples", verify_rows=True)
    if check_sha256:
        verify(directory, manifest, check_sha256=True)
    return [directory / f["path"] for f in manifest["files"] if f["path"].startswith(f"{split}/")]


def read_metadata(directory: str | Path) -> ExampleMetadata:
    """The ExampleMetadata of a finished examples directory (from its first file's schema)."""
    directory = Path(directory)
    for split in ("train", "valid"):
        for path in example_files(directory, split):
            with pa.memory_map(str(path)) as source:
                schema, _ = open_arrow_ipc(source)
                return ExampleMetadata.from_arrow(schema, where=str(path))
    raise StageError(f"{directory} holds no example files")


def iter_record_batches(directory: str | Path, split: str = "train") -> Iterator[pa.RecordBatch]:
    """Record batches of ``split`` in file order, memory-mapped (zero copy); IPC streams or older IPC files."""
    for path in example_files(directory, split):
        with pa.memory_map(str(path)) as source:
            _, batches = open_arrow_ipc(source)
            yield from batches


def iter_examples(directory: str | Path, split: str = "train") -> Iterator[dict]:
    """One dict per example (column name → Python value), in file order. Convenient, not fast."""
    for batch in iter_record_batches(directory, split):
        yield from batch.to_pylist()
