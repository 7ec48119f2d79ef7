"""Reading raw corpora: finding input files, decoding bytes, and turning records into paragraphs.

Inputs are *units*: a plain-text file (``.txt``, anything else), a JSONL file (``.jsonl``/``.json``/
``.ndjson``) with a text field, a tab-separated table (``.tsv``: the first line names the columns, each row
is a document, e.g. a GLUE task's unlabelled sentences for task-adaptive pretraining), each optionally
compressed (``.gz``, ``.zst``/``.zstd``, ``.xz``, ``.bz2``),
a Parquet file with a text column (a directory of them, e.g. a Spark or Hugging Face Parquet export, is one
unit per file), a Hugging Face dataset saved with ``save_to_disk``, or ``hf://NAME[:CONFIG][@SPLIT]`` read
with ``datasets.load_dataset(..., streaming=True)``. Every reader streams: a line, a record or a Parquet
record batch at a time, never a whole file (except a ``--doc-boundary file`` document, which is the file).
A truncated compressed file raises ``EOFError`` and a corrupt one ``OSError`` where the damage is met, so
the shard stage keeps the documents read before it.

Decoding: every line is tried as UTF-8; a line that is not valid UTF-8 is decoded as cp1252 (Windows
Western, a superset of latin-1's printable range), with the five bytes cp1252 leaves undefined taken as
latin-1. Such lines are counted (``decode_fallback_lines``/``_files``), never fatal. A file whose first
64 KiB hold NUL bytes (and no UTF-16 byte-order mark) or mostly control bytes is binary: skipped with a
warning and counted.
"""

from __future__ import annotations

import codecs
import gzip
import io
import itertools
import json
import logging
import lzma
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.cjk import join_lines
from data_prep.manifest import StageError

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
TEXT_SUFFIXES = {".txt", ".text"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
TSV_SUFFIXES = {".tsv"}
COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd", ".xz", ".bz2"}  # streamed through a decompressor
ZSTD_READ_BYTES = 1 << 20  # compressed bytes fed to the zstd decompressor at a time
BINARY_SNIFF_BYTES = 64 * 1024
MAX_CONTROL_BYTE_SHARE = 0.10  # more control bytes than this in the first 64 KiB: not text
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\v\x1b")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _cp1252_else_latin1(error: UnicodeDecodeError) -> tuple[str, int]:
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("bertpipe_latin1", _cp1252_else_latin1)


def decode_line(raw: bytes, stats: Counter) -> str:
    """UTF-8, else cp1252 (undefined bytes as latin-1); a fallback is counted in ``stats``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["decode_fallback_lines"] += 1
        return raw.decode("cp1252", errors="bertpipe_latin1")


@dataclass(frozen=True)
class InputUnit:
    """One thing to read: a file, a saved dataset directory, or an ``hf://`` dataset."""

    kind: str  # "text" | "jsonl" | "tsv" | "parquet" | "hf_disk" | "hf_hub"
    location: str  # a path, or the hf:// spec as given
    size: int  # bytes on disk (0 when unknown), used to balance work

    def fingerprint(self) -> list:
        """What identifies this input's content: path, size and mtime of each file (hf://: the spec)."""
        if self.kind == "hf_hub":
            return [self.kind, self.location]
        path = Path(self.location)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [self.kind, self.location, [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _file_kind(path: Path) -> str | None:
    """The reader for a file by its suffix (a compression suffix looked through); None for unknown suffixes."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] in PARQUET_SUFFIXES:
            return None  # Parquet compresses its own pages; a compressed Parquet file cannot be streamed
        if not suffixes or suffixes[-1] not in JSONL_SUFFIXES | TSV_SUFFIXES:
            return "text"
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in TSV_SUFFIXES:
        return "tsv"
    if last in PARQUET_SUFFIXES:
        return "parquet"
    if last in TEXT_SUFFIXES:
        return "text"
    return None


def discover_inputs(inputs: list[str]) -> tuple[list[InputUnit], list[str]]:
    """The input units under ``inputs`` (directories searched recursively, hidden entries skipped).

    Returns (units sorted by location, files skipped for an unknown suffix). A named file is read as
    plain text whatever its suffix; inside a directory only known suffixes are read.
    """
    units: dict[str, InputUnit] = {}
    skipped: list[str] = []
    for spec in inputs:
        if spec.startswith(HF_SCHEME):
            units[spec] = InputUnit("hf_hub", spec, 0)
            continue
        path = Path(spec)
        if not path.exists():
            raise StageError(f"input {spec} does not exist: check the --input path")
        if path.is_file():
            units[str(path)] = InputUnit(_file_kind(path) or "text", str(path), path.stat().st_size)
            continue
        if is_saved_dataset(path):
            units[str(path)] = InputUnit("hf_disk", str(path), _dir_size(path))
            continue
        for root, dirs, files in os.walk(path):
            root_path = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for d in list(dirs):
                if is_saved_dataset(root_path / d):
                    dirs.remove(d)
                    sub = root_path / d
                    units[str(sub)] = InputUnit("hf_disk", str(sub), _dir_size(sub))
            for name in sorted(files):
                file = root_path / name
                if name.startswith("."):
                    continue
                kind = _file_kind(file)
                if kind is None:
                    skipped.append(str(file))
                    continue
                units[str(file)] = InputUnit(kind, str(file), file.stat().st_size)
    return sorted(units.values(), key=lambda u: u.location), skipped


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _ZstdReader(io.RawIOBase):
    """A zstd file's decompressed bytes, frame after frame; ``EOFError`` when the last frame is cut short.

    (zstandard's own ``stream_reader`` ends quietly at a truncated frame: the loss would go unnoticed.)
    """

    def __init__(self, path: str) -> None:
        try:
            import zstandard
        except ImportError:
            raise StageError(
                f"{path} is zstd-compressed: install zstandard (pip install zstandard) to read it"
            ) from None
        self._error = zstandard.ZstdError
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._fed = False  # the current frame has been given input
        self._file = open(path, "rb")  # noqa: SIM115 (closed with this reader)
        self._path = path
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        """Always: a reader."""
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Fill ``buffer`` with decompressed bytes; 0 at the end of the file."""
        while not self._pending:
            chunk = self._file.read(ZSTD_READ_BYTES)
            if not chunk:
                if self._fed and not self._frame.eof:
                    raise EOFError(f"{self._path}: the zstd data ends inside a frame (a truncated file)")
                return 0
            self._pending = memoryview(self._decompress(chunk))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        try:
            while chunk:
                if self._frame.eof:  # the next frame of a multi-frame file (pzstd, appended streams)
                    self._frame = self._decompressor.decompressobj()
                self._fed = True
                out.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
        except self._error as e:
            raise OSError(f"{self._path}: damaged zstd data ({e})") from e
        return b"".join(out)

    def close(self) -> None:
        """Close the file."""
        self._file.close()
        super().close()


def _open_binary(path: str) -> io.BufferedIOBase:
    suffix = Path(path).suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix in (".zst", ".zstd"):
        return io.BufferedReader(_ZstdReader(path), BINARY_SNIFF_BYTES)
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    return open(path, "rb", buffering=BINARY_SNIFF_BYTES)  # noqa: SIM115


def sniff_binary(head: bytes) -> bool:
    """NUL bytes (without a UTF-16 byte-order mark) or mostly control bytes: not a text file."""
    if not head or head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    if b"\x00" in head:
        return True
    return sum(head.count(b) for b in _CONTROL_BYTES) > MAX_CONTROL_BYTE_SHARE * len(head)


def iter_lines(path: str, stats: Counter) -> Iterator[str]:
    """Decoded lines of a (possibly compressed) text file, without line ends; nothing for a binary file."""
    with _open_binary(path) as f:
        head = f.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES] if hasattr(f, "peek") else b""
        if sniff_binary(head):
            log.warning("skipping %s: it looks binary (NUL or control bytes), not text", path)
            stats["binary_files_skipped"] += 1
            return
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            for line in io.TextIOWrapper(f, encoding="utf-16", errors="replace", newline=None):
                yield line.rstrip("\n")
            return
        before = stats["decode_fallback_lines"]
        first = True
        try:
            for raw in f:
                if first:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                    first = False
                yield decode_line(raw, stats).rstrip("\r\n")
        except lzma.LZMAError as e:  # the one decompressor whose damage is not an OSError or EOFError
            raise OSError(f"{path}: damaged xz data ({e})") from e
        if stats["decode_fallback_lines"] > before:
            stats["decode_fallback_files"] += 1
            log.info(
                "%s: %d lines were not UTF-8, decoded as cp1252/latin-1",
                path,
                stats["decode_fallback_lines"] - before,
            )


def paragraphs_of(text: str) -> list[str]:
    """Blank-line separated paragraphs, hard-wrapped lines joined (``cjk.join_lines``: no space between two
    CJK characters) and whitespace collapsed to one space."""
    paragraphs = (join_lines(p.splitlines()) for p in _BLANK_LINE.split(text.replace("\r\n", "\n")))
    return [p for p in paragraphs if p]


def iter_text_documents(path: str, doc_boundary: str, stats: Counter) -> Iterator[tuple[str, list[str]]]:
    """(source "file:line", paragraphs) of a plain-text file.

    ``blank-line``: every blank-line separated block is a document (one paragraph).
    ``file``: the whole file is one document; blank lines separate its paragraphs.
    """
    numbered = enumerate(iter_lines(path, stats), start=1)
    head = []
    for number, line in numbered:
        head.append((number, line))
        if line.strip():
            break
    numbered = itertools.chain(head, numbered)
    if head and head[-1][1].startswith(CONLL_DOCUMENT_START):
        yield from iter_conll_documents(path, numbered)
        return
    paragraphs: list[str] = []
    lines: list[str] = []
    start = 1
    for number, line in numbered:
        if line.strip():
            if not lines and not paragraphs:
                start = number
            lines.append(line)
            continue
        if lines:
            paragraphs.append(join_lines(lines))
            lines = []
        if doc_boundary == "blank-line" and paragraphs:
            yield f"{path}:{start}", paragraphs
            paragraphs = []
    if lines:
        paragraphs.append(join_lines(lines))
    if paragraphs:
        yield f"{path}:{start}", paragraphs


CONLL_DOCUMENT_START = "-DOCSTART-"


def iter_conll_documents(path: str, numbered: Iterator[tuple[int, str]]) -> Iterator[tuple[str, list[str]]]:
    """(source "file:line", sentences) of a CoNLL column file (one token a line, its first column the word;
    a blank line ends a sentence, a ``-DOCSTART-`` line a document), as CoNLL-2003's files are: the words
    become text, the tags are dropped. A plain-text file whose first line is ``-DOCSTART-`` is read so."""
    sentences: list[str] = []
    words: list[str] = []
    start = 1
    for number, line in numbered:
        fields = line.split()
        if fields and fields[0] != CONLL_DOCUMENT_START:
            if not words and not sentences:
                start = number
            words.append(fields[0])
            continue
        if words:
            sentences.append(" ".join(words))
            words = []
        if fields and sentences:  # -DOCSTART-: the document so far is complete
            yield f"{path}:{start}", sentences
            sentences = []
    if words:
        sentences.append(" ".join(words))
    if sentences:
        yield f"{path}:{start}", sentences


def iter_jsonl_documents(path: str, text_field: str, stats: Counter) -> Iterator[tuple[str, list[str]]]:
    """(source "file#record", paragraphs) of each JSON line; bad lines are counted and skipped."""
    for record, line in enumerate(iter_lines(path, stats)):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            stats["bad_records"] += 1
            if stats["bad_records"] <= 3:
                log.warning("%s#%d is not valid JSON; skipped", path, record)
            continue
        text = value.get(text_field) if isinstance(value, dict) else None
        if not isinstance(text, str):
            stats["bad_records"] += 1
            if stats["bad_records"] <= 3:
                log.warning("%s#%d has no string field %r; skipped", path, record, text_field)
            continue
        yield f"{path}#{record}", paragraphs_of(text)


def iter_tsv_documents(path: str, text_field: str, stats: Counter) -> Iterator[tuple[str, list[str]]]:
    """(source "file#row", paragraphs) of column ``text_field`` of each row of a table whose first line is a
    header; fields split on tabs only, no quoting (GLUE's sentences may start with a quote character)."""
    lines = iter_lines(path, stats)
    header = next(lines, None)
    if header is None:
        return
    names = [name.strip() for name in header.split("\t")]
    _check_column(names, text_field, path)
    column = names.index(text_field)
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= column:
            stats["bad_records"] += 1
            if stats["bad_records"] <= 3:
                log.warning("%s#%d has %d fields, no column %r; skipped", path, row, len(fields), text_field)
            continue
        yield f"{path}#{row}", paragraphs_of(fields[column])


def _numbered(batches: Iterator[list]) -> Iterator[tuple[int, object]]:
    """(row number, value) over a stream of column batches."""
    index = 0
    for batch in batches:
        for value in batch:
            yield index, value
            index += 1


def iter_parquet_documents(path: str, text_field: str, stats: Counter) -> Iterator[tuple[str, list[str]]]:
    """(source "file#row", paragraphs) of each row's text column, read one record batch at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _check_column(parquet.schema_arrow.names, text_field, path)
    batches = (b.column(0).to_pylist() for b in parquet.iter_batches(batch_size=1024, columns=[text_field]))
    yield from _records(_numbered(batches), path, stats)


def _records(
    rows: Iterator[tuple[int, object]], where: str, stats: Counter
) -> Iterator[tuple[str, list[str]]]:
    for index, text in rows:
        if not isinstance(text, str):
            stats["bad_records"] += 1
            continue
        yield f"{where}#{index}", paragraphs_of(text)


def _check_column(names: list[str], text_field: str, where: str) -> None:
    if text_field not in names:
        raise StageError(
            f"{where} has no column {text_field!r} (columns: {', '.join(names)}): pass --text-field"
        )


def iter_saved_dataset_documents(
    path: str, text_field: str, stats: Counter
) -> Iterator[tuple[str, list[str]]]:
    """Rows of a ``save_to_disk`` dataset (every split of a DatasetDict, in split-name order)."""
    import datasets

    loaded = datasets.load_from_disk(path)
    splits = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        where = f"{path}/{split}" if split else path
        _check_column(dataset.column_names, text_field, where)
        batches = (b[text_field] for b in dataset.select_columns([text_field]).iter(batch_size=1024))
        yield from _records(_numbered(batches), where, stats)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf://NAME[:CONFIG][@SPLIT]`` → (name, config or None, split, default "train")."""
    rest = spec[len(HF_SCHEME) :]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise StageError(
            f"{spec}: expected hf://NAME[:CONFIG][@SPLIT], e.g. hf://wikitext:wikitext-103-raw-v1"
        )
    return name, config or None, split or "train"


def iter_hub_documents(spec: str, text_field: str, stats: Counter) -> Iterator[tuple[str, list[str]]]:
    """Rows of ``datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)``."""
    import datasets

    name, config, split = parse_hf_spec(spec)
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (connection, missing config, ...)
        raise StageError(f"cannot open {spec} with datasets.load_dataset: {e}") from e
    rows = ((i, row.get(text_field)) for i, row in enumerate(dataset))
    yield from _records(rows, spec, stats)


def iter_unit_documents(
    unit: InputUnit, doc_boundary: str, text_field: str, stats: Counter
) -> Iterator[tuple[str, list[str]]]:
    """(source, paragraphs) of every document of one input unit."""
    if unit.kind == "text":
        return iter_text_documents(unit.location, doc_boundary, stats)
    if unit.kind == "jsonl":
        return iter_jsonl_documents(unit.location, text_field, stats)
    if unit.kind == "tsv":
        return iter_tsv_documents(unit.location, text_field, stats)
    if unit.kind == "parquet":
        return iter_parquet_documents(unit.location, text_field, stats)
    if unit.kind == "hf_disk":
        return iter_saved_dataset_documents(unit.location, text_field, stats)
    if unit.kind == "hf_hub":
        return iter_hub_documents(unit.location, text_field, stats)
    raise AssertionError(f"unknown input kind {unit.kind}")
