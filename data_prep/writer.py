"""Writing example shards: Arrow IPC streams (memory-mappable) of record batches built from flat arrays.

The IPC *stream* layout, not the IPC *file* layout (a stream plus a footer): ``datasets.Dataset.from_file``
reads only streams, and a memory-mapped stream is read without a copy all the same
(``data_prep.manifest.open_arrow_ipc``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.examples import ExampleArrays
from data_prep.manifest import atomic_path

# Arrow → numpy integer types without DataType.to_pandas_dtype(), which imports pandas (~0.2 s at start-up).
_NUMPY_TYPES = {
    pa.int8(): np.int8,
    pa.uint8(): np.uint8,
    pa.uint16(): np.uint16,
    pa.int32(): np.int32,
    pa.int64(): np.int64,
}


def numpy_type(arrow_type: pa.DataType) -> type:
    """The numpy integer type of an Arrow integer type."""
    return _NUMPY_TYPES[arrow_type]


# pa.array(ndarray) and Array.to_numpy() import pandas on first use; these two go through the buffers.
def to_arrow(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """A non-null Arrow integer array of ``values`` (converted to ``arrow_type``, zero-copy when it is)."""
    values = np.ascontiguousarray(values, dtype=numpy_type(arrow_type))
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def to_numpy(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a non-null Arrow integer array."""
    dtype = np.dtype(numpy_type(array.type))
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


def list_offsets(array: pa.ListArray) -> np.ndarray:
    """The ``len(array) + 1`` offsets of a list array as an int32 view."""
    return np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array) + 1, offset=array.offset * 4)


def _list_array(offsets: np.ndarray, values: np.ndarray, list_type: pa.ListType) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        to_arrow(offsets, pa.int32()), to_arrow(values, list_type.value_type), type=list_type
    )


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
            to_arrow(examples.next_sentence_label, pa.int8()),
            _list_array(mlm_offsets, positions, types[3]),
            _list_array(mlm_offsets, labels, types[4]),
            to_arrow(examples.a_doc_id, pa.int64()),
            to_arrow(examples.b_doc_id, pa.int64()),
        ],
        schema=schema,
    )


class ExampleFileWriter:
    """Appends record batches to one example shard; the file appears (atomically) only when complete."""

    def __init__(self, writer: pa.ipc.RecordBatchStreamWriter):
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
        pa.ipc.new_stream(sink, schema) as writer,
    ):
        yield ExampleFileWriter(writer)
