"""The examples stage: corpus shards + vocabulary → MLM/NSP example shards (Arrow IPC), restartable.

``generate_examples(ExamplesConfig(...))`` runs in three steps: make sure every corpus shard is tokenised
in the cache (tokcache), draw each split's negative pool, then build the examples of consecutive cache
blocks of about PART_TOKENS tokens per output file, ``<out>/<split>/<shard name>[-NNN].arrow``. Both the
tokenising and the part jobs go through a mapper (``data_prep.parallel``): a local process pool by default,
Prefect tasks or a Dask cluster when an orchestrator passes one; each job carries all it needs. Work is
split by cache blocks, not whole shards, so one huge book does not leave a worker idle. Every random draw
is seeded from (seed, split, shard, document, dupe round) or (seed, split, shard, block, batch),
so the output does not depend on --workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep import examples as ex
from data_prep import tokcache, zh_words
from data_prep.cjk import decode_wordpieces
from data_prep.manifest import (
    StageError,
    atomic_path,
    begin_stage,
    directory_mode,
    file_entry,
    read_manifest,
    require_complete,
    stage_fingerprint,
    write_json_atomic,
)
from data_prep.masking import never_predicted_ids
from data_prep.parallel import Mapper, local_mapper
from data_prep.schema import FORMAT_VERSION as SCHEMA_FORMAT_VERSION
from data_prep.schema import (
    WORD_START_COLUMN,
    ExampleMetadata,
    continuation_table,
    example_schema,
    replacement_ids,
)
from data_prep.vocab import TOKENIZER_FILES
from data_prep.writer import open_example_file, record_batch, to_arrow

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
MASKING_MODES = ("static", "dynamic")
VOCAB_DIR = "vocab"  # the tokenizer files copied beside the examples, so the trainer needs nothing else
PART_TOKENS = 1 << 19  # cache tokens per output file / unit of work (whole cache blocks, at least one)
# The stage's version, in its fingerprint (a change rebuilds complete example directories): the column
# contract's (in every shard's metadata) plus one per change of layout since: +1, IPC streams instead of IPC
# files (datasets.Dataset.from_file opens streams; the trainer still reads the older files).
FORMAT_VERSION = SCHEMA_FORMAT_VERSION + 1


@dataclass
class ExamplesConfig:
    """Settings of the examples stage; validated on construction."""

    corpus: Path  # a finished `bertpipe shard` directory
    vocab: Path  # a vocab stage directory, a tokenizer directory, a tokenizer.json or a vocab.txt
    out: Path  # the stage directory to write
    max_seq_length: int = 128  # tokens per example including [CLS] and two [SEP]
    masking: str = "static"  # "static": masked here; "dynamic": stored unmasked, the trainer masks
    dupe_factor: int = 1  # passes over the corpus, each with other chunk boundaries, pairs and masks
    masked_lm_prob: float = 0.15  # share of tokens to predict
    max_predictions_per_seq: int | None = (
        None  # cap per example; None: round(max_seq_length * masked_lm_prob)
    )
    short_seq_prob: float = 0.1  # share of chunks given a random shorter target length
    whole_word_mask: bool = False  # mask all WordPieces of a word together
    seed: int = 12345
    workers: int = 1  # processes; the output is the same for any value
    cache_dir: Path | None = None  # token cache root; None: <out>/../.bertpipe-cache
    batch_size: int = 4096  # examples per Arrow record batch
    negative_pool_tokens: int = 1 << 21  # random next segments come from a sample of the split this big

    def __post_init__(self) -> None:
        self.corpus, self.vocab, self.out = Path(self.corpus), Path(self.vocab), Path(self.out)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
            if self.cache_dir.exists() and not self.cache_dir.is_dir():
                raise ValueError(
                    f"--cache-dir {self.cache_dir} is a file: give a directory for the token cache"
                )
        if self.max_seq_length < ex.MIN_MAX_SEQ_LENGTH:
            raise ValueError(
                f"max_seq_length={self.max_seq_length} is too small: [CLS] A [SEP] B [SEP] needs at least "
                f"{ex.MIN_MAX_SEQ_LENGTH}; use 128 or 512 as BERT does"
            )
        if self.max_seq_length > 65535:
            raise ValueError(f"max_seq_length={self.max_seq_length} exceeds 65535 (positions are uint16)")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking={self.masking!r}: choose one of {', '.join(MASKING_MODES)}")
        if not 0.0 < self.masked_lm_prob <= 1.0:
            raise ValueError(f"masked_lm_prob={self.masked_lm_prob} must be in (0, 1]; BERT uses 0.15")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob={self.short_seq_prob} must be in [0, 1]; BERT uses 0.1")
        if self.dupe_factor < 1:
            raise ValueError(f"dupe_factor={self.dupe_factor} must be at least 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be at least 1")
        if self.batch_size < 1 or self.negative_pool_tokens < 1:
            raise ValueError("batch_size and negative_pool_tokens must be positive")
        if self.max_predictions_per_seq is None:
            self.max_predictions_per_seq = max(1, round(self.max_seq_length * self.masked_lm_prob))
        if not 1 <= self.max_predictions_per_seq <= self.max_seq_length - 3:
            raise ValueError(
                f"max_predictions_per_seq={self.max_predictions_per_seq} must be in "
                f"[1, max_seq_length - 3 = {self.max_seq_length - 3}]"
            )
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be non-negative")

    def stage_config(self) -> dict:
        """What the output depends on (the fingerprint): not paths, workers or the cache location."""
        config = asdict(self)
        for name in ("corpus", "vocab", "out", "workers", "cache_dir"):
            config.pop(name)
        return config

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out.resolve().parent / ".bertpipe-cache"


@dataclass
class _Part:
    """One unit of work: the examples of cache blocks ``first_block .. stop_block - 1`` of one corpus shard."""

    split: str
    split_index: int
    shard_index: int
    cache_file: Path
    first_block: int
    stop_block: int
    out_file: Path
    tokens: int


def plan_parts(block_tokens: list[int], part_tokens: int | None = None) -> list[tuple[int, int]]:
    """Consecutive block ranges ``(first, stop)`` of about ``part_tokens`` tokens (a function of the cache
    only, so file names and contents do not depend on --workers)."""
    part_tokens = PART_TOKENS if part_tokens is None else part_tokens
    ranges, first, tokens = [], 0, 0
    for block, count in enumerate(block_tokens):
        if tokens and tokens + count > part_tokens:
            ranges.append((first, block))
            first, tokens = block, 0
        tokens += count
    if first < len(block_tokens):
        ranges.append((first, len(block_tokens)))
    return ranges


CONTEXT_FILE = ".part-context.pkl"  # in the stage directory while its parts are written, then removed


@dataclass
class _Context:
    """What every part job needs besides its _Part, built once in the parent and passed with each job."""

    config: ExamplesConfig
    metadata: ExampleMetadata
    pools: dict[str, ex.DocumentBlock]
    replacement_ids: np.ndarray
    continuation: np.ndarray | None  # per vocabulary id, "##" pieces; None without whole-word masking
    never_ids: np.ndarray  # never a prediction: [PAD] [UNK] [CLS] [SEP] [MASK]
    tokens: list[str]


def _corpus_files(corpus_manifest: dict) -> dict[str, list[str]]:
    files = {split: [] for split in SPLITS}
    for entry in corpus_manifest["files"]:
        split = entry["path"].split("/", 1)[0]
        # A shard without documents (a small corpus, an empty valid split) yields no example file.
        if split in files and entry["path"].endswith(".parquet") and entry.get("rows") != 0:
            files[split].append(entry["path"])
    return {split: sorted(paths) for split, paths in files.items()}


def corpus_segmenter(corpus_manifest: dict) -> str | None:
    """The word segmenter of the corpus's language (the shard manifest's ``language``): "jieba <version>"
    for Chinese, whose whole-word masking groups the characters of a word; None otherwise."""
    return zh_words.segmenter_for((corpus_manifest.get("config") or {}).get("language"))


def ensure_token_cache(
    config: ExamplesConfig, corpus_manifest: dict, vocab, map_jobs: Mapper | None = None
) -> dict[str, list[tuple]]:
    """Tokenise every corpus shard that is not cached yet; returns split → [(name, cache file, counts)].

    ``map_jobs`` runs one ``tokcache.build_shard_cache`` job per missing shard; None: ``config.workers``
    local processes.
    """
    content_key = tokcache.corpus_content_key(config.corpus, corpus_manifest)
    segmenter = corpus_segmenter(corpus_manifest)  # Chinese is segmented once, whatever the masking
    cache = tokcache.cache_directory(config.resolved_cache_dir(), content_key, vocab, segmenter)
    sha256 = {entry["path"]: entry.get("sha256") for entry in corpus_manifest["files"]}
    shards = []
    for split, paths in _corpus_files(corpus_manifest).items():
        for path in paths:
            shards.append((split, path, cache / Path(path).with_suffix(".arrow")))
    missing = [
        (split, path, cache_file)
        for split, path, cache_file in shards
        if tokcache.cached_shard_counts(cache_file, config.corpus / path, sha256[path]) is None
    ]
    if missing:
        log.info("tokenising %d of %d corpus shards into %s", len(missing), len(shards), cache)
        jobs = [
            (config.corpus / path, cache_file, vocab, sha256[path], segmenter)
            for _, path, cache_file in missing
        ]
        jobs.sort(key=lambda job: -job[0].stat().st_size)  # biggest first: better balance
        if segmenter is not None:
            zh_words.load()  # once here: forked workers inherit the loaded dictionary
        with _mapper(config, map_jobs) as run_jobs:
            run_jobs(tokcache.build_shard_cache, jobs, "tokenising")
    else:
        log.info("all %d corpus shards found tokenised in %s", len(shards), cache)
    result: dict[str, list[tuple]] = {split: [] for split in SPLITS}
    for split, path, cache_file in shards:
        result[split].append((Path(path).stem, cache_file, tokcache.shard_counts(cache_file)))
    return result


def _mapper(config: ExamplesConfig, map_jobs: Mapper | None) -> contextlib.AbstractContextManager[Mapper]:
    """``map_jobs``, or the default: ``config.workers`` forked processes that inherit the jobs' arguments
    (the vocabulary, the negative pools) instead of unpickling them per job."""
    return (
        local_mapper(config.workers, start_method="fork")
        if map_jobs is None
        else contextlib.nullcontext(map_jobs)
    )


@dataclass(frozen=True)
class _ContextFile:
    """A _Context pickled once into the stage directory, handed to jobs by path: a job sent to another
    process (a Dask worker) carries a path, not megabytes of negative pools each, and each process unpickles
    the context once (the Dask run of a 1 GB corpus held ~9.5 GB of copies in its workers and scheduler)."""

    path: str
    sha256: str  # of the pickle: a later run's context at the same path is never taken for an earlier one

    @classmethod
    def write(cls, context: _Context, path: Path) -> _ContextFile:
        data = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return cls(str(path), hashlib.sha256(data).hexdigest())

    def load(self) -> _Context:
        loaded = _LOADED_CONTEXT.get("entry")
        if loaded is None or loaded[0] != self:
            loaded = (self, pickle.loads(Path(self.path).read_bytes()))
            _LOADED_CONTEXT["entry"] = loaded  # one assignment: threads of one process may share it
        return loaded[1]


_LOADED_CONTEXT: dict = {}  # this process's last loaded _ContextFile and its _Context


def _generate_part(part: _Part, context: _Context | _ContextFile) -> dict:
    """Write the examples of one part (all dupe rounds) and its stats sidecar; returns its stats."""
    if isinstance(context, _ContextFile):
        context = context.load()
    config, metadata = context.config, context.metadata
    schema = example_schema(metadata)
    pool = context.pools[part.split]
    max_num_tokens = config.max_seq_length - 3
    special = metadata.special_ids
    stats = _empty_stats()
    batch_index = 0

    def emit(spans: ex.SpanLists, count: int, block: ex.DocumentBlock, block_index: int, writer) -> None:
        nonlocal batch_index
        taken = spans.take(count)
        # Batches never span blocks: (block, batch within block) names the rng whatever the parts.
        rng = ex.batch_rng(config.seed, part.split_index, part.shard_index, (block_index << 32) | batch_index)
        batch_index += 1
        whole_word = context.continuation is not None
        arrays = ex.assemble_examples(
            taken,
            block.ids,
            pool.ids,
            max_num_tokens,
            special["cls"],
            special["sep"],
            rng,
            block.continues_word if whole_word else None,
            pool.continues_word if whole_word else None,
        )
        masked = None
        if config.masking == "static":
            masked = ex.mask_examples(
                arrays,
                config.masked_lm_prob,
                config.max_predictions_per_seq,
                special["mask"],
                context.replacement_ids,
                rng,
                context.continuation,
                context.never_ids,
            )
        elif whole_word:  # the trainer masks these words (the word_start column)
            arrays.word_start = ex.example_word_starts(arrays, context.continuation, context.never_ids)
        _add_batch_stats(stats, arrays, taken, masked, config.max_seq_length)
        if stats["example"] is None and arrays.num_examples:
            stats["example"] = _decode_example(arrays, 0, context.tokens)
        writer.write(_record_batch(arrays, schema))

    with open_example_file(part.out_file, schema) as writer:
        if pool.num_docs == 0:
            log.warning("%s split has no documents: %s stays empty", part.split, part.out_file.name)
        blocks = tokcache.iter_blocks(part.cache_file, part.first_block, part.stop_block)
        for block_index, block in enumerate(blocks if pool.num_docs else (), start=part.first_block):
            spans, batch_index = ex.SpanLists(), 0
            for dupe_round in range(config.dupe_factor):
                for doc in range(block.num_docs):
                    rng = ex.document_rng(
                        config.seed, part.split_index, part.shard_index, block.doc_ids[doc], dupe_round
                    )
                    ex.segment_document(block, doc, pool, max_num_tokens, config.short_seq_prob, rng, spans)
                    while len(spans) >= config.batch_size:
                        emit(spans, config.batch_size, block, block_index, writer)
            if len(spans):
                emit(spans, len(spans), block, block_index, writer)
    log.info("%s/%s: %d examples", part.split, part.out_file.name, stats["examples"])
    write_json_atomic(_stats_file(part.out_file), stats)
    return stats


def _record_batch(arrays: ex.ExampleArrays, schema: pa.Schema) -> pa.RecordBatch:
    """``writer.record_batch`` plus the ``word_start`` column of dynamic whole-word masking."""
    if WORD_START_COLUMN not in schema.names:
        return record_batch(arrays, schema)
    core = pa.schema([f for f in schema if f.name != WORD_START_COLUMN], metadata=schema.metadata)
    batch = record_batch(arrays, core)
    word_start = pa.ListArray.from_arrays(
        to_arrow(arrays.offsets, pa.int32()),
        to_arrow(arrays.word_start, pa.uint8()),
        type=schema.field(WORD_START_COLUMN).type,
    )
    return pa.RecordBatch.from_arrays([*batch.columns, word_start], schema=schema)


def _stats_file(out_file: Path) -> Path:
    return out_file.with_name(f".{out_file.stem}.stats.json")


def _empty_stats() -> dict:
    return {
        "examples": 0,
        "tokens": 0,
        "random_next": 0,
        "truncated": 0,
        "short_target": 0,
        "masked": 0,
        "masked_as_mask": 0,
        "masked_as_random": 0,
        "candidates": 0,
        "capped": 0,
        "padding": 0,
        "example": None,
    }


def _add_batch_stats(
    stats: dict, arrays: ex.ExampleArrays, spans: dict, masked: dict | None, max_len: int
) -> None:
    lengths = arrays.lengths
    stats["examples"] += arrays.num_examples
    stats["tokens"] += int(lengths.sum())
    stats["padding"] += int((max_len - lengths).sum())
    stats["random_next"] += int(arrays.next_sentence_label.sum())
    stats["truncated"] += int(arrays.truncated.sum())
    stats["short_target"] += int(spans["short_target"].sum())
    for key, value in (masked or {}).items():
        stats[key] += value


def _decode_example(arrays: ex.ExampleArrays, row: int, tokens: list[str]) -> dict:
    """One example for a human to read: ``text`` decoded (``##`` pieces joined, no spaces between CJK
    characters), ``tokens`` one by one, and its labels."""
    start, end = int(arrays.offsets[row]), int(arrays.offsets[row + 1])
    pieces = [tokens[i] for i in arrays.input_ids[start:end]]
    example = {
        "text": decode_wordpieces(pieces),
        "tokens": " ".join(pieces),
        "token_type_ids": "".join(str(t) for t in arrays.token_type_ids[start:end]),
        "next_sentence_label": int(arrays.next_sentence_label[row]),
        "a_doc_id": int(arrays.a_doc_id[row]),
        "b_doc_id": int(arrays.b_doc_id[row]),
    }
    if arrays.masked_lm_offsets is not None:
        lo, hi = int(arrays.masked_lm_offsets[row]), int(arrays.masked_lm_offsets[row + 1])
        example["masked_lm"] = " ".join(
            f"{p}:{tokens[i]}"
            for p, i in zip(arrays.masked_lm_positions[lo:hi], arrays.masked_lm_ids[lo:hi], strict=True)
        )
    return example


def _summarise(part_stats: list[dict], config: ExamplesConfig) -> dict:
    total = _empty_stats()
    by_split: dict[str, int] = {}
    for split, stats in part_stats:
        by_split[split] = by_split.get(split, 0) + stats["examples"]
        for key, value in stats.items():
            if key == "example":
                total["example"] = total["example"] or value
            else:
                total[key] += value
    n = max(total["examples"], 1)
    summary = {
        "examples": total["examples"],
        "examples_by_split": by_split,
        "tokens": total["tokens"],
        "mean_length": round(total["tokens"] / n, 2),
        "padding_tokens_if_fixed_length": total["padding"],
        "padding_share_if_fixed_length": round(total["padding"] / max(n * config.max_seq_length, 1), 4),
        "nsp_random_next_share": round(total["random_next"] / n, 4),
        "truncated_share": round(total["truncated"] / n, 4),
        "short_target_share": round(total["short_target"] / n, 4),
    }
    if config.masking == "static":
        masked = max(total["masked"], 1)
        summary.update(
            {
                "masked": total["masked"],
                "masked_share_of_tokens": round(total["masked"] / max(total["tokens"], 1), 4),
                "masked_share_of_candidates": round(total["masked"] / max(total["candidates"], 1), 4),
                "masked_as_mask_share": round(total["masked_as_mask"] / masked, 4),
                "masked_as_random_share": round(total["masked_as_random"] / masked, 4),
                "masked_kept_share": round(
                    (total["masked"] - total["masked_as_mask"] - total["masked_as_random"]) / masked, 4
                ),
                "prediction_cap_share": round(total["capped"] / n, 4),
            }
        )
    summary["example"] = total["example"]
    return summary


def _single_document_warnings(cached: dict[str, list[tuple]]) -> list[str]:
    """A warning for each split of exactly one document: its random next segments cannot come from another."""
    warnings = []
    for split, shards in cached.items():
        if sum(counts["documents"] for _, _, counts in shards) == 1:
            warnings.append(
                f"the {split} split holds 1 document: with fewer than 2 documents, random next segments come "
                "from the same document (NSP negatives are not from another text); give a corpus of several "
                "documents (--doc-boundary blank-line splits a file at blank lines)"
            )
    return warnings


def _stage_inputs(corpus_manifest: dict, vocab, config: ExamplesConfig) -> dict[str, str]:
    inputs = {"corpus": corpus_manifest["fingerprint"], "vocab": vocab.fingerprint}
    segmenter = _masking_segmenter(config, corpus_manifest)
    if segmenter is not None:  # its words decide the masks: another version, other examples
        inputs["segmenter"] = segmenter
    return inputs


def _masking_segmenter(config: ExamplesConfig, corpus_manifest: dict) -> str | None:
    """The segmenter whose words whole-word masking groups, None when masking is not whole-word or the
    corpus language is not segmented."""
    return corpus_segmenter(corpus_manifest) if config.whole_word_mask else None


def expected_fingerprint(config: ExamplesConfig) -> str:
    """The fingerprint the stage directory will have (the corpus and vocabulary must be complete)."""
    from data_prep.vocab import load_vocab

    inputs = _stage_inputs(require_complete(config.corpus, "shard"), load_vocab(config.vocab), config)
    return stage_fingerprint("examples", config.stage_config(), inputs, FORMAT_VERSION)


def generate_examples(config: ExamplesConfig, map_jobs: Mapper | None = None) -> dict:
    """Run the examples stage; returns its manifest (the existing one when nothing changed).

    ``map_jobs`` runs the tokenising jobs and then the part jobs (``data_prep.parallel``: each job carries
    all it needs); None: ``config.workers`` local processes.
    """
    from data_prep.vocab import load_vocab

    started = time.perf_counter()
    corpus_manifest = require_complete(config.corpus, "shard")
    vocab = load_vocab(config.vocab)
    metadata = ExampleMetadata(
        vocab_fingerprint=vocab.fingerprint,
        vocab_size=vocab.size,
        special_ids=dict(vocab.special_ids),
        max_seq_length=config.max_seq_length,
        masking=config.masking,
        masked_lm_prob=config.masked_lm_prob,
        max_predictions_per_seq=config.max_predictions_per_seq,
        whole_word_mask=config.whole_word_mask,
        seed=config.seed,
        lowercase=vocab.lowercase,
        word_segmenter=_masking_segmenter(config, corpus_manifest),
        extra={
            "dupe_factor": config.dupe_factor,
            "short_seq_prob": config.short_seq_prob,
            "corpus_fingerprint": corpus_manifest["fingerprint"],
            "random_replacement": "any id but special and [reserved] tokens",
            "negative_pool_tokens": config.negative_pool_tokens,
        },
    )
    inputs = _stage_inputs(corpus_manifest, vocab, config)
    stage = begin_stage(config.out, "examples", config.stage_config(), inputs, FORMAT_VERSION)
    if stage.complete:
        log.info("%s is complete for this configuration: nothing to do", config.out)
        return read_manifest(config.out)

    cached = ensure_token_cache(config, corpus_manifest, vocab, map_jobs)
    warnings = _single_document_warnings(cached)
    for warning in warnings:
        log.warning("%s", warning)
    pools = {}
    for split, shards in cached.items():
        total = sum(counts["tokens"] for _, _, counts in shards)
        pools[split] = tokcache.sample_pool(
            [cache_file for _, cache_file, _ in shards], total, config.negative_pool_tokens, config.seed
        )
    context = _Context(
        config=config,
        metadata=metadata,
        pools=pools,
        replacement_ids=replacement_ids(vocab.tokens, vocab.special_ids),
        continuation=continuation_table(vocab.tokens) if config.whole_word_mask else None,
        never_ids=never_predicted_ids(vocab.special_ids),
        tokens=vocab.tokens,
    )
    parts, part_stats, todo = [], {}, []
    for split_index, split in enumerate(SPLITS):
        for shard_index, (name, cache_file, counts) in enumerate(cached[split]):
            block_tokens = counts["block_tokens"]
            ranges = plan_parts(block_tokens)
            for k, (first, stop) in enumerate(ranges):
                file_name = f"{name}.arrow" if len(ranges) == 1 else f"{name}-{k:03d}.arrow"
                part = _Part(
                    split,
                    split_index,
                    shard_index,
                    cache_file,
                    first,
                    stop,
                    stage.path(f"{split}/{file_name}"),
                    sum(block_tokens[first:stop]),
                )
                parts.append(part)
                done = _read_part_stats(part.out_file)
                if done is not None:
                    part_stats[part.out_file] = done
                else:
                    todo.append(part)
    if len(todo) < len(parts):
        log.info("reusing %d example files of an interrupted run", len(parts) - len(todo))
    todo.sort(key=lambda p: -p.tokens)
    context_file = stage.path(CONTEXT_FILE)
    try:
        with _mapper(config, map_jobs) as run_jobs:
            # forked local workers inherit the context; any other mapper's jobs may be pickled one by one
            shared = context if map_jobs is None else _ContextFile.write(context, context_file)
            results = run_jobs(_generate_part, [(part, shared) for part in todo], "examples")
    finally:
        context_file.unlink(missing_ok=True)
        _LOADED_CONTEXT.clear()  # this process (a flow's, a worker's) need not keep the pools past its stage
    part_stats.update(zip((p.out_file for p in todo), results, strict=True))

    files, ordered = [], []
    for part in parts:
        stats = part_stats[part.out_file]
        files.append(
            file_entry(stage.directory, f"{part.split}/{part.out_file.name}", rows=stats["examples"])
        )
        ordered.append((part.split, stats))
    files += _copy_vocab(config.vocab, vocab, stage.directory)
    summary = _summarise(ordered, config)
    if warnings:
        summary["warnings"] = warnings
    summary["seconds"] = round(time.perf_counter() - started, 2)
    manifest = stage.commit(files, summary, extra={"vocab_dir": VOCAB_DIR})
    for part in parts:
        _stats_file(part.out_file).unlink(missing_ok=True)
    if summary["example"]:
        log.info("example: %s", json.dumps(summary["example"], ensure_ascii=False))
    log.info(
        "%d examples (%d tokens, NSP random %.3f, truncated %.3f) in %.1fs → %s",
        summary["examples"],
        summary["tokens"],
        summary["nsp_random_next_share"],
        summary["truncated_share"],
        summary["seconds"],
        config.out,
    )
    return manifest


def _copy_vocab(source: Path, vocab, stage_dir: Path) -> list[dict]:
    """Copy the tokenizer files of ``source`` into ``<stage_dir>/vocab`` (atomically); their manifest entries.

    A directory gives its BERT tokenizer files, a single file itself; vocab.txt is written from the loaded
    tokens when the source has none (a tokenizer.json alone), so BERT-style loaders find it too.
    """
    if source.is_dir():
        found = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
    else:
        found = {"tokenizer.json" if source.suffix == ".json" else "vocab.txt": source}
    target = stage_dir / VOCAB_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{VOCAB_DIR}.", suffix=".tmp", dir=stage_dir))
    try:
        os.chmod(tmp, directory_mode())  # mkdtemp's 0o700 would hide the vocabulary from teammates
        for name, path in found.items():
            shutil.copyfile(path, tmp / name)
        if "vocab.txt" not in found:
            from data_prep.vocab import write_vocab_txt

            write_vocab_txt(tmp / "vocab.txt", vocab.tokens)
        for path in tmp.iterdir():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        if target.exists():  # left by an interrupted run of the same fingerprint
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    names = sorted(p.name for p in target.iterdir())
    return [file_entry(stage_dir, f"{VOCAB_DIR}/{name}") for name in names]


def _read_part_stats(out_file: Path) -> dict | None:
    """Stats of a part file committed by an interrupted run of the same fingerprint, else None."""
    stats_file = _stats_file(out_file)
    if not (out_file.exists() and stats_file.exists()):
        return None
    try:
        return json.loads(stats_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


__all__ = ["ExamplesConfig", "StageError", "ensure_token_cache", "generate_examples"]
