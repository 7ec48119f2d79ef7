"""Writing example shards: Arrow IPC files (memory-mappable) of record batches built from flat arrays."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.examples import ExampleArrays
from data_prep.manifest import atomic_path


def _list_array(offsets: np.ndarray, values: np.ndarray, list_type: pa.ListType) -> pa.ListArray:
    values = pa.array(values.astype(list_type.value_type.to_pandas_dtype(), copy=False))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32, copy=False)), values, type=list_type)


def record_batch(examples: ExampleArrays, schema: pa.Schema) -> pa.RecordBatch:
    """One record batch of ``schema`` (data_prep.schema.example_schema) from assembled examples.

    Dynamic mode (no masked_lm_* arrays) stores empty prediction lists.
    """
    num_examples = examples.num_examples
    if examples.masked_lm_offsets is None:
        mlm_offsets = np.zeros(num_examples + 1, dtype=np.int32)
        positions = np.zeros(0, dtype=np.uint16)
        labels = np.zeros(0, dtype=examples.input_ids.dtype)
    else:
        mlm_offsets, positions, labels = (
            examples.masked_lm_offsets,
            examples.masked_lm_positions,
            examples.masked_lm_ids,
        )
    types = [f.type for f in schema]
    return pa.RecordBatch.from_arrays(
        [
            _list_array(examples.offsets, examples.input_ids, types[0]),
            _list_array(examples.offsets, examples.token_type_ids, types[1]),
            pa.array(examples.next_sentence_label.astype(np.int8, copy=False)),
            _list_array(mlm_offsets, positions, types[3]),
            _list_array(mlm_offsets, labels, types[4]),
            pa.array(examples.a_doc_id.astype(np.int64, copy=False)),
            pa.array(examples.b_doc_id.astype(np.int64, copy=False)),
        ],
        schema=schema,
    )


class ExampleFileWriter:
    """Appends record batches to one Arrow IPC file; the file appears (atomically) only when complete."""

    def __init__(self, writer: pa.ipc.RecordBatchFileWriter):
        self._writer = writer
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows


@contextlib.contextmanager
def open_example_file(path: str | Path, schema: pa.Schema) -> Iterator[ExampleFileWriter]:
    """Write ``path`` through a temporary file renamed into place on success (never a partial shard)."""
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):
        yield ExampleFileWriter(writer)
