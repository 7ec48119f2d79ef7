"""The `bertpipe` command line: one command per stage, each a thin call of the stage's function."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from flows.config import STAGES, default_shared

app = typer.Typer(
    name="bertpipe",
    help="BERT pretraining pipeline: shard → vocab → examples → pretrain → finetune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    """Report a user mistake in one line and exit 2 (never a traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


# --- a full disk: one line that says where, for every command that writes ------------------------------------


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it came from) is a full disk or an exceeded quota."""
    from data_prep.manifest import disk_full_error

    return disk_full_error(error) is not None


def disk_full_message(error: BaseException, *places: str | Path | None) -> str:
    """One line for a full disk: the file the error names, else of the ``places`` the command writes (its --out
    first) the one with the least space left, and how much that is."""
    from data_prep.manifest import error_chain, format_bytes, free_bytes

    named = next((e.filename for e in error_chain(error) if isinstance(e, OSError) and e.filename), None)
    candidates = [Path(str(p)) for p in ((named,) if named else places) if p] or [Path(".")]
    free = {path: free_bytes(path) for path in candidates}
    where = min(candidates, key=lambda p: float("inf") if free[p] is None else free[p])
    space = "unknown space" if free[where] is None else format_bytes(free[where])
    return f"the disk is full writing {where} ({space} free): free space or choose another --out"


@contextlib.contextmanager
def stage_errors(out: str | Path, *also_writes: str | Path | None):
    """A stage command's failure as one line and exit 2 when it is the user's to fix: a full disk while writing
    ``out`` (or ``also_writes``: a cache), a mistake in the inputs or settings (ValueError, StageError), or a
    worker process that died (``WorkerLost``: re-running resumes). Anything else keeps its traceback. The stages
    commit atomically, so what a failure leaves behind never passes for a complete stage."""
    from data_prep.parallel import find_worker_lost

    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            fail(disk_full_message(e, out, *also_writes))
        if (lost := find_worker_lost(e)) is not None:
            fail(str(lost))
        if isinstance(e, ValueError):  # data_prep.manifest.StageError included
            fail(str(e))
        raise


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


# --- the configs own their defaults ----------------------------------------------------------------------------
# A stage's options default to None and only what the user gave is passed on, so the config dataclass decides
# the rest; --help reads the defaults it shows from the same dataclass.


def given(**options: Any) -> dict[str, Any]:
    """The options the user gave (not None); the config's own defaults decide the rest."""
    return {name: value for name, value in options.items() if value is not None}


class ConfigDefaultsCommand(TyperCommand):
    """A command whose --help shows, for each option left at None, the default of the config field it sets.

    The config class is imported for --help only: a command starts without importing torch for it.
    """

    config = ""  # "module:Class" of the config dataclass
    renames: dict[str, str] = {}  # option name → config field, where the two differ

    def format_help(self, ctx, formatter) -> None:
        module, _, name = self.config.partition(":")
        fields = dataclasses.fields(getattr(importlib.import_module(module), name))
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        shown = []
        for param in self.params:
            value = defaults.get(self.renames.get(param.name, param.name))
            if param.default is None and not param.required and value is not None:
                if isinstance(value, tuple | list):
                    value = ",".join(map(str, value))  # as the option takes it: --seeds 0,1,2
                shown.append(param)
                param.default = value
        try:
            super().format_help(ctx, formatter)
        finally:
            for param in shown:
                param.default = None


def config_defaults(config: str, **renames: str) -> type[TyperCommand]:
    """The command class for a command that fills ``config`` (``module:Class``); ``renames``: option → field."""
    attributes = {"config": config, "renames": renames}
    return type(f"{config.rpartition(':')[2]}Command", (ConfigDefaultsCommand,), attributes)


# Stage commands are added below, one block each.


# --- shard -------------------------------------------------------------------------------------------------
@app.command(cls=config_defaults("data_prep.shard:ShardConfig"))
def shard(
    input: list[str] = typer.Option(..., "--input", help="File, dir, saved dataset, hf://NAME[:CONFIG]."),
    out: Path = typer.Option(..., "--out", help="Stage directory to write."),
    num_shards: int = typer.Option(..., "--num-shards", help="Parquet parts per split."),
    doc_boundary: str | None = typer.Option(None, "--doc-boundary", help="Plain text: blank-line or file."),
    valid_fraction: float | None = typer.Option(
        None, "--valid-fraction", help="Share of documents for validation."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Mixed into the shard/split placement hash."),
    workers: int | None = typer.Option(
        None, "--workers", help="Processes; the output does not depend on it."
    ),
    text_field: str | None = typer.Option(
        None, "--text-field", help="Text field of JSONL/Parquet/HF inputs, column of .tsv tables."
    ),
    language: str | None = typer.Option(None, "--language", help="Sentence splitter language code."),
    near_dup_threshold: float | None = typer.Option(
        None, "--near-dup-threshold", help="Jaccard similarity that makes a near-duplicate."
    ),
    no_near_dup: bool = typer.Option(False, "--no-near-dup", help="Keep near-duplicates (same as 0)."),
    force: bool | None = typer.Option(None, "--force", help="Rebuild even if the stage is complete."),
) -> None:
    """Raw text/JSONL/Parquet/HF datasets → sentence-split documents in N Parquet shards."""
    from data_prep.shard import ShardConfig, shard_corpus

    with stage_errors(out):
        config = ShardConfig(
            inputs=input, out=str(out), num_shards=num_shards,
            **given(doc_boundary=doc_boundary, valid_fraction=valid_fraction, seed=seed, workers=workers,
                    text_field=text_field, language=language, force=force,
                    near_dup_threshold=0.0 if no_near_dup else near_dup_threshold),
        )  # fmt: skip
        manifest = shard_corpus(config)
    stats = manifest["stats"]
    typer.echo(
        f"{out}: {stats['documents']} documents, {stats['sentences']} sentences, {stats['words']} words "
        f"({stats['splits']['valid']['documents']} valid; {stats['dropped']['near_duplicate']} near-duplicates "
        "dropped)"
    )


# --- vocab -------------------------------------------------------------------------------------------------
@app.command(cls=config_defaults("data_prep.vocab:VocabConfig"))
def vocab(
    corpus: Path = typer.Option(..., "--corpus", help="A finished shard stage directory."),
    out: Path = typer.Option(..., "--out", help="Stage directory to write."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="Tokens, special tokens included."),
    lowercase: bool | None = typer.Option(
        None, "--lowercase/--cased", help="Uncased (BERT-uncased) or cased."
    ),
    min_frequency: int | None = typer.Option(None, "--min-frequency", help="Minimum count of a merge."),
    character_coverage: float | None = typer.Option(
        None, "--character-coverage", help="Share of character occurrences the alphabet covers (1: all)."
    ),
    from_path: str | None = typer.Option(None, "--from", help="Adopt this vocab.txt or tokenizer dir."),
    sample_bytes: int | None = typer.Option(
        None, "--sample-bytes", help="Train on ~this many bytes (documents by content hash)."
    ),
    max_words: int | None = typer.Option(
        None,
        "--max-words",
        help="Train on at most this many distinct words (the most frequent; bounds memory).",
    ),
    force: bool | None = typer.Option(None, "--force", help="Rebuild even if the stage is complete."),
) -> None:
    """WordPiece vocabulary trained on the corpus's train split (or adopted with --from)."""
    from data_prep.vocab import VocabConfig, train_vocab

    with stage_errors(out):
        config = VocabConfig(
            corpus=str(corpus), out=str(out),
            **given(vocab_size=vocab_size, lowercase=lowercase, min_frequency=min_frequency,
                    character_coverage=character_coverage, from_path=from_path, sample_bytes=sample_bytes,
                    max_words=max_words, force=force),
        )  # fmt: skip
        manifest = train_vocab(config)
    stats = manifest["stats"]
    typer.echo(
        f"{out}: {stats['vocab_size']} tokens; {stats['stats_split']} split: UNK rate {stats['unk_rate']:.4%}, "
        f"{stats['tokens_per_word']:.3f} tokens per word"
    )
    if stats.get("requested_vocab_size"):
        typer.echo(
            f"note: asked for {stats['requested_vocab_size']} tokens; this corpus gives {stats['vocab_size']}"
        )


# --- examples ----------------------------------------------------------------------------------------------
@app.command(cls=config_defaults("data_prep.examples_stage:ExamplesConfig"))
def examples(
    corpus: Path = typer.Option(..., "--corpus", help="A finished `bertpipe shard` directory."),
    vocab: Path = typer.Option(..., "--vocab", help="Vocab stage, tokenizer dir or vocab.txt."),
    out: Path = typer.Option(..., "--out", help="Stage directory to write."),
    max_seq_length: int = typer.Option(..., "--max-seq-length", help="Tokens per example (L)."),
    masking: str | None = typer.Option(None, "--masking", help="static or dynamic."),
    dupe_factor: int | None = typer.Option(None, "--dupe-factor", help="Passes over the corpus."),
    masked_lm_prob: float | None = typer.Option(None, "--masked-lm-prob", help="Share of tokens to predict."),
    max_predictions_per_seq: int | None = typer.Option(
        None, "--max-predictions-per-seq", help="Cap per example (default round(L * prob))."
    ),
    short_seq_prob: float | None = typer.Option(
        None, "--short-seq-prob", help="Share of shorter target lengths."
    ),
    whole_word_mask: bool | None = typer.Option(None, "--whole-word-mask", help="Mask all pieces of a word."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    workers: int | None = typer.Option(
        None, "--workers", help="Processes; the output does not depend on it."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Token cache (default beside --out)."),
) -> None:
    """Corpus shards + vocabulary → MLM/NSP examples (Arrow IPC), Google's algorithm, streaming."""
    from data_prep.examples_stage import ExamplesConfig, generate_examples

    with stage_errors(out, cache_dir):
        config = ExamplesConfig(
            corpus=corpus, vocab=vocab, out=out, max_seq_length=max_seq_length,
            **given(masking=masking, dupe_factor=dupe_factor, masked_lm_prob=masked_lm_prob,
                    max_predictions_per_seq=max_predictions_per_seq, short_seq_prob=short_seq_prob,
                    whole_word_mask=whole_word_mask, seed=seed, workers=workers, cache_dir=cache_dir),
        )  # fmt: skip
        manifest = generate_examples(config)
    stats = manifest["stats"]
    typer.echo(
        f"{out}: {stats['examples']} examples, {stats['tokens']} tokens, "
        f"NSP random {stats['nsp_random_next_share']:.3f}, truncated {stats['truncated_share']:.3f}"
    )


# --- verify ----------------------------------------------------------------------------------------------
@app.command()
def verify(
    directory: Path = typer.Argument(..., help="A stage directory, or a run root holding several."),
) -> None:
    """Check stage directories against their manifests, every file's sha256 included: one line per stage."""
    from data_prep.manifest import INPROGRESS, StageError, find_stage_directories, read_json, read_manifest
    from data_prep.manifest import verify as verify_stage

    if not directory.is_dir():
        fail(f"{directory} is not a directory: give a stage directory or a run root")
    stages = find_stage_directories(directory)
    if not stages:
        fail(f"{directory} is neither a stage directory nor a run root holding some (no manifest.json found)")
    failed = 0
    for stage_dir in stages:
        manifest = read_manifest(stage_dir)
        if manifest is None:
            failed += 1
            stage = (read_json(stage_dir / INPROGRESS) or {}).get("stage") or "its stage"
            typer.echo(f"FAILED {stage_dir}: unfinished (no complete manifest.json): re-run bertpipe {stage}")
            continue
        try:
            verify_stage(stage_dir, manifest, check_sha256=True)
        except (StageError, OSError) as e:
            failed += 1
            typer.echo(f"FAILED {stage_dir}: {str(e).splitlines()[0]}")
            continue
        size = sum(entry.get("bytes") or 0 for entry in manifest["files"])
        typer.echo(f"ok     {stage_dir}: {manifest['stage']}, {len(manifest['files'])} files, {size:,} bytes")
    if failed:
        raise typer.Exit(code=2)


# --- finetune ---------------------------------------------------------------------------------------


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None


@app.command(cls=config_defaults("bert.finetune.config:FinetuneConfig", eval_="eval", threads="num_threads"))
def finetune(
    task: str = typer.Option(
        ..., "--task", help="cola, sst2, mrpc, rte, stsb, classification, regression, ner, squad, squad_v2."
    ),
    model: Path = typer.Option(
        ..., "--model", help="Hugging Face model directory (config.json, weights, tokenizer)."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory: metrics.json, predictions/, model/."),
    train: Path = typer.Option(
        None,
        "--train",
        help="Training file (TSV/CSV/JSONL, CoNLL, SQuAD JSON) or save_to_disk dir; default: the standard dataset.",
    ),
    eval_: Path = typer.Option(
        None, "--eval", help="Evaluation file, as --train; default: the standard validation split."
    ),
    epochs: int = typer.Option(None, "--epochs", help="Default: the task's (see bert.finetune.tasks.TASKS)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate; default: the task's."),
    batch_size: int = typer.Option(None, "--batch-size", help="Default: the task's."),
    max_seq_length: int = typer.Option(None, "--max-seq-length", help="Default: the task's."),
    seeds: str | None = typer.Option(
        None, "--seeds", help="Comma-separated seeds, one fine-tuning run each."
    ),
    text_columns: str = typer.Option(
        None,
        "--text-columns",
        help="One or two columns: header names, or 0-based numbers for files without a header.",
    ),
    label_column: str = typer.Option(None, "--label-column", help="Label column (name or 0-based number)."),
    warmup_ratio: float | None = typer.Option(None, "--warmup-ratio", help="Share of steps warming up."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW decoupled weight decay."),
    max_grad_norm: float | None = typer.Option(None, "--max-grad-norm", help="Gradient clipping (0: off)."),
    eval_batch_size: int | None = typer.Option(None, "--eval-batch-size"),
    doc_stride: int | None = typer.Option(
        None, "--doc-stride", help="QA: step between context windows, in tokens."
    ),
    max_answer_length: int | None = typer.Option(
        None, "--max-answer-length", help="QA: longest answer, in tokens."
    ),
    null_score_threshold: float | None = typer.Option(
        None, "--null-score-threshold", help="SQuAD v2: no-answer margin."
    ),
    max_train_examples: int = typer.Option(
        None, "--max-train-examples", help="Train on a fixed random subsample."
    ),
    max_eval_examples: int = typer.Option(
        None, "--max-eval-examples", help="Evaluate on a fixed random subsample."
    ),
    threads: int = typer.Option(None, "--threads", help="torch intra-op threads."),
    device: str | None = typer.Option(
        None, "--device", help="auto (the GPU when CUDA is available), cpu, cuda or cuda:N."
    ),
    precision: str | None = typer.Option(
        None, "--precision", help="fp32, or bf16 (autocast: faster with large batches only)."
    ),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Progress bars on stderr."),
    save_model: bool | None = typer.Option(
        None, "--save-model/--no-save-model", help="Save the best checkpoint to OUT/model."
    ),
) -> None:
    """Fine-tune and evaluate a model on a task over several seeds → OUT/metrics.json."""
    from bert.finetune import FinetuneConfig
    from bert.finetune import main as finetune_main

    try:
        config = FinetuneConfig(
            task=task, model=model, out=out,
            **given(train=train, eval=eval_, seeds=_parse_seeds(seeds) if seeds is not None else None,
                    epochs=epochs, lr=lr, batch_size=batch_size, max_seq_length=max_seq_length,
                    eval_batch_size=eval_batch_size, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                    max_grad_norm=max_grad_norm, doc_stride=doc_stride, max_answer_length=max_answer_length,
                    null_score_threshold=null_score_threshold,
                    text_columns=tuple(c.strip() for c in text_columns.split(",")) if text_columns else None,
                    label_column=label_column, max_train_examples=max_train_examples,
                    max_eval_examples=max_eval_examples, num_threads=threads, device=device,
                    precision=precision, progress=progress, save_model=save_model),
        )  # fmt: skip
        summary = finetune_main(config)
    except (ValueError, OSError) as e:  # TaskDataError is a ValueError; both name the file and line
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if summary["median"]:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in summary["median"].items())
        typer.echo(f"{out}/metrics.json: {summary['task']} median over seeds: {scores}")
    if summary["degenerate_seeds"]:
        typer.echo(f"degenerate seeds (not scored): {summary['degenerate_seeds']}", err=True)


# --- pretrain ----------------------------------------------------------------------------------------------
@app.command(
    cls=config_defaults(
        "bert.pretrain.config:TrainConfig",
        accumulation="gradient_accumulation_steps",
        progress="progress_bar",
        compile_="compile",
    )
)
def pretrain(
    examples: Path = typer.Option(None, "--examples", help="A finished `bertpipe examples` directory."),
    out: Path = typer.Option(None, "--out", help="Run directory (checkpoints/, hf/, metrics.jsonl)."),
    model_config: str = typer.Option(
        None, "--model-config", help="Preset (tiny/mini/small/base/large) or config.json."
    ),
    deepspeed_config: Path = typer.Option(
        None, "--deepspeed-config", help="DeepSpeed JSON (deepspeed_configs/)."
    ),
    num_gpus: int = typer.Option(
        None, "--num-gpus", help="Ranks on this machine (CPU: processes over gloo)."
    ),
    hostfile: Path = typer.Option(
        None, "--hostfile", help="Several nodes started from here over ssh: 'HOST slots=N' lines."
    ),
    nnodes: int = typer.Option(
        None, "--nnodes", help="Several nodes, one `bertpipe pretrain` on each (SLURM, Kubernetes): how many."
    ),
    node_rank: int = typer.Option(None, "--node-rank", help="This node's number, 0 to --nnodes - 1."),
    master_addr: str = typer.Option(None, "--master-addr", help="Address of node rank 0 (with --nnodes)."),
    master_port: int = typer.Option(
        None, "--master-port", help="Port of rank 0 (default: 29500 with --nnodes, else a free one)."
    ),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps from the start of training."),
    time_budget: str = typer.Option(None, "--time-budget", help="Wall time of this run, e.g. 2h, 90m."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/latest."),
    init_from: Path = typer.Option(None, "--init-from", help="Phase 2: start from this HF dir or run dir."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocabulary (default: the one the examples record)."),
    config_file: Path = typer.Option(None, "--config", help="TrainConfig JSON; the flags override it."),
    global_batch_size: int = typer.Option(None, "--global-batch-size", help="micro × accumulation × ranks."),
    micro_batch_size: int = typer.Option(
        None, "--micro-batch-size", help="Examples per rank per micro step."
    ),
    accumulation: int = typer.Option(
        None, "--gradient-accumulation-steps", help="Micro steps per optimizer step."
    ),
    optimizer: str = typer.Option(None, "--optimizer", help="adamw or lamb."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear warmup steps."),
    decay: str = typer.Option(None, "--decay", help="linear, polynomial or constant."),
    schedule_steps: int = typer.Option(
        None, "--schedule-steps", help="Schedule length (default --max-steps)."
    ),
    precision: str = typer.Option(None, "--precision", help="auto (the DeepSpeed JSON's), fp32, bf16, fp16."),
    seed: int = typer.Option(None, "--seed", help="Data order, masking, dropout."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: at the end)."),
    keep_last: int = typer.Option(None, "--keep-last", help="Checkpoints to keep."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps (0: at the end)."),
    export_every: int = typer.Option(None, "--export-every", help="HF export every N steps (0: at the end)."),
    log_example_indices: bool = typer.Option(
        None, "--log-example-indices", help="OUT/data_log/rank<R>.jsonl."
    ),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar on rank 0."),
    compile_: bool = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model (default: on CUDA only)."
    ),
    profile_steps: str = typer.Option(
        None, "--profile-steps", help="START:STOP: torch.profiler over these steps → OUT/profile/rank<R>/."
    ),
) -> None:
    """Pretrain (MLM + NSP) with DeepSpeed on every rank → OUT/checkpoints, OUT/hf, OUT/metrics.jsonl."""
    import json

    try:
        values = json.loads(config_file.read_text()) if config_file else {}
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read --config {config_file}: {e}")
    flags = dict(
        examples=examples, out=out, model_config=model_config, deepspeed_config=deepspeed_config,
        max_steps=max_steps, time_budget=time_budget, init_from=init_from, vocab=vocab,
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation, optimizer=optimizer, lr=lr, warmup_steps=warmup_steps,
        decay=decay, schedule_steps=schedule_steps, precision=precision, seed=seed, save_every=save_every,
        keep_last=keep_last, eval_every=eval_every, export_every=export_every,
        log_example_indices=log_example_indices, progress_bar=progress, compile=compile_,
        profile_steps=profile_steps,
    )  # fmt: skip
    values.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
    values["resume"] = resume or values.get("resume", False)
    from bert.pretrain.launch import Nodes, check_launch, check_pretrain_launch

    nodes = None
    try:
        if (nnodes, node_rank, master_addr) != (None, None, None):
            nodes = Nodes(num_nodes=1 if nnodes is None else nnodes, node_rank=node_rank or 0,
                          master_addr=master_addr)  # fmt: skip
        check_launch(num_gpus, str(hostfile) if hostfile else None, nodes, master_port)
    except ValueError as e:
        fail(str(e))
    for name in ("examples", "out"):
        if not values.get(name):
            fail(f"--{name} is required")
    from bert.pretrain.config import TrainConfig
    from bert.pretrain.stage import run_pretrain_stage
    from data_prep.manifest import StageError

    try:
        config = TrainConfig.from_dict(values)
        check_pretrain_launch(config, num_gpus, str(hostfile) if hostfile else None, nodes, master_port)
        manifest, result = run_pretrain_stage(
            config, num_gpus=num_gpus, hostfile=str(hostfile) if hostfile else None, resume=config.resume,
            nodes=nodes, master_port=master_port,
        )  # fmt: skip
    except (StageError, ValueError, OSError) as e:
        fail(str(e))
    if manifest is None and result is None:  # a node other than node 0
        typer.echo(f"node {nodes.node_rank}: its ranks are done; node 0 reports the run ({config.out})")
        return
    if result is None:
        typer.echo(f"{config.out}: already complete at step {manifest['stats']['step']} for these settings; "
                   f"model in {Path(config.out) / 'hf'}")  # fmt: skip
        return
    loss = result.metrics.get("loss")
    typer.echo(
        f"{result.out}: stopped at step {result.step} ({result.stop_reason})"
        + (f", loss {loss:.4f}" if loss is not None else "")
        + (f"; model in {result.hf_dir}" if result.hf_dir else "")
    )
    if result.stop_reason in ("sigterm", "time_budget"):
        typer.echo(f"checkpointed at step {result.step}: run the same command with --resume to continue")


# --- run (the whole pipeline, as the Prefect flow) ------------------------------------------------------------


def prefect_defaults() -> None:
    """Settings Prefect needs on a small shared machine, unless the user set them (see PREFECT_NOTES)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry tries the network
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 20 s is too tight here
    # The stages' own log lines go to Prefect's handlers: into the run log (UI) and, with the task's name, the
    # console. Prefect formats the console itself, so the plain handler of the other commands goes.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "data_prep,bert,flows")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)


EMBEDDED_SERVER_APP = "prefect.server.api.server:create_app"  # what Prefect's ephemeral uvicorn serves
RUN_MARK_ENV = "BERTPIPE_RUN_MARK"  # "<pid>:<start time>" of the `bertpipe run` whose server this is


def _is_embedded_server(process) -> bool:
    try:
        command = process.cmdline()
    except Exception:  # psutil.Error: gone or unreadable
        return False
    return "uvicorn" in command and EMBEDDED_SERVER_APP in command


def watch_embedded_server(mark: str, poll_s: float = 0.5, grace_s: float = 5.0) -> None:
    """Wait for the `bertpipe run` that ``mark`` names to end, then end the Prefect servers it started.

    Prefect stops its embedded server at a normal exit, but not when `bertpipe run` is killed outright (kill -9,
    the OOM killer), and not always under load; then the uvicorn process (220 MB) runs on forever. A server is
    known by its command line and by ``mark`` in its environment (inherited from `bertpipe run`), so this finds
    it even after init adopted it, and never takes another run's server.
    """
    import psutil

    pid, started = mark.split(":")
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(int(pid))
        while parent.is_running() and f"{parent.create_time()}" == started:
            if parent.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(poll_s)
    tree = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if _is_embedded_server(process) and process.environ().get(RUN_MARK_ENV) == mark:
                tree += [process, *process.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def start_server_watchdog() -> subprocess.Popen:
    """A small process that outlives this one and ends Prefect's embedded server once this process is gone.

    In a session of its own, so the Ctrl-C or the process-group SIGTERM that stops `bertpipe run` does not stop
    it first; it exits by itself once this process has ended.
    """
    import psutil

    mark = f"{os.getpid()}:{psutil.Process().create_time()}"
    os.environ[RUN_MARK_ENV] = mark  # the server Prefect starts from here inherits it
    code = f"from flows.cli import watch_embedded_server; watch_embedded_server({mark!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


@app.command()
def run(
    config: str = typer.Option(
        "demo", "--config", help="Pipeline preset name (configs/pipeline/) or JSON file."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a setting: section.key=value (e.g. pretrain.lr=1e-3); repeatable."
    ),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for every stage's output."),
    shared: Path = typer.Option(
        None,
        "--shared",
        help="Where relative corpus/task paths are read from: SHARED/data (default ../shared).",
    ),
    stages: str = typer.Option(
        ",".join(STAGES),
        "--stages",
        help="Comma-separated stages to run, in pipeline order.",
    ),
    dask_address: str = typer.Option(
        None,
        "--dask-address",
        help="Run the data stages' per-shard tasks on this Dask scheduler (tcp://...).",
    ),
) -> None:
    """Run the pipeline as the Prefect flow `bert-pipeline` (no server needed: Prefect's embedded one).

    Stages whose directory already holds a complete manifest for the same inputs and settings are cached, so
    a re-run finishes an interrupted run and redoes only what a changed setting affects.
    """
    import json as _json

    prefect_defaults()
    from data_prep.parallel import find_worker_lost
    from flows.config import PipelineConfigError
    from flows.pipeline import bert_pipeline, prepare

    shared = shared or default_shared()
    if not (shared / "data").is_dir():
        fail(f"--shared {shared}: no data/ directory there (relative corpus and task paths are read from it)")
    stage_list = [s.strip() for s in stages.split(",") if s.strip()]
    try:  # every stage's config and inputs are checked before Prefect starts
        prepare(config, overrides, out, shared, stage_list)
    except (PipelineConfigError, ValueError) as e:
        fail(str(e))
    start_server_watchdog()  # Prefect's embedded server must not outlive a kill -9 of this process
    state = bert_pipeline(config=config, overrides=overrides, out=str(out), shared=str(shared),
                          stages=stage_list, dask_address=dask_address, return_state=True)  # fmt: skip
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        if isinstance(error, BaseException) and is_disk_full(error):
            fail(disk_full_message(error, out))
        if isinstance(error, BaseException) and (lost := find_worker_lost(error)) is not None:
            fail(str(lost))  # one line, exit 2: the stages kept what was complete, a re-run resumes
        message = str(error).splitlines()[0] if isinstance(error, BaseException) else state.message
        typer.secho(f"error: the pipeline run ended {state.name}: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    typer.echo(_json.dumps(state.result(), indent=2, default=str))


@app.command()
def retrain(
    config: str = typer.Option(
        "retrain-demo", "--config", help="Retrain preset name (configs/pipeline/) or JSON file."
    ),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override a setting: section.key=value (e.g. gate.mlm_loss_tolerance=0.1); repeatable.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Root of every retraining run: registry/, data/, runs/, evals/."
    ),
    shared: Path = typer.Option(
        None,
        "--shared",
        help="Where relative corpus/task paths are read from: SHARED/data (default ../shared).",
    ),
) -> None:
    """Retrain on what is new in the corpus as the Prefect flow `bert-retrain` (Prefect's embedded server).

    The first run (empty registry) trains from scratch and makes version 1 champion; later runs continue the
    champion on new files only, and promote the result when the gate holds. Nothing new: ends at once. A registry
    that cannot be read, or none while ROOT holds earlier runs, is refused: see `bertpipe models rebuild`.
    """
    import json as _json

    prefect_defaults()
    from flows.config import PipelineConfigError
    from flows.retrain import open_champion
    from flows.retrain import retrain as retrain_flow
    from flows.retrain_plan import load_retrain_config

    shared = shared or default_shared()
    try:  # every section is checked before Prefect starts
        load_retrain_config(config, overrides)
    except (PipelineConfigError, ValueError) as e:
        fail(str(e))
    try:  # and the registry: readable, a champion with its weights, or no earlier runs to continue
        open_champion(out.absolute())
    except ValueError as e:
        fail(_one_line(e))
    state = retrain_flow(
        config=config, overrides=overrides, out=str(out), shared=str(shared), return_state=True
    )
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        message = str(error).splitlines()[0] if isinstance(error, BaseException) else state.message
        typer.secho(f"error: the retraining run ended {state.name}: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    summary = state.result()
    typer.echo(_json.dumps(summary, indent=2, default=str))
    typer.echo(f"{summary.get('decision')}: {summary.get('reason')}", err=True)


@app.command()
def deploy(
    pool: str = typer.Option("bertpipe", "--pool", help="Process work pool to create if missing."),
    name: str = typer.Option(
        None, "--name", help="Deploy only this deployment (default: all in prefect.yaml)."
    ),
) -> None:
    """Create the process work pool (if missing) and register prefect.yaml's deployments on the Prefect server."""
    import subprocess

    prefect = str(Path(sys.executable).parent / "prefect")
    repo = Path(__file__).resolve().parents[1]
    exists = subprocess.run([prefect, "work-pool", "inspect", pool], capture_output=True, text=True)
    if exists.returncode != 0:
        created = subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], text=True)
        if created.returncode != 0:
            fail(f"could not create the work pool {pool}: is PREFECT_API_URL set to a running server?")
    which = ["--name", name] if name else ["--all"]
    env = {**os.environ, "BERTPIPE_REPO": str(repo)}  # prefect.yaml's pull step: run flows in this clone
    done = subprocess.run([prefect, "--no-prompt", "deploy", *which], cwd=repo, env=env, text=True)
    if done.returncode != 0:
        fail("prefect deploy failed (see above)")
    typer.echo(f"deployed; start a worker with: prefect worker start --pool {pool}")


# --- models (the model registry, flows/registry.py) ---------------------------------------------------------

models_app = typer.Typer(
    help="The model registry (MLflow): versions, metrics, lineage, the champion.", no_args_is_help=True
)
app.add_typer(models_app, name="models")

ROOT_HELP = (
    "Run root of the retrain flow (its --out): the registry is ROOT/registry/mlflow.db, "
    "unless MLFLOW_TRACKING_URI names another MLflow store."
)


def _registry(root: Path):
    from flows.registry import Registry

    return Registry(root)


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _runs_hint(root: Path) -> str:
    """For an empty registry: the earlier runs it could be rebuilt from, if ROOT holds any."""
    from flows.retrain_plan import earlier_runs

    runs = earlier_runs(root)
    if not runs:
        return ""
    rebuild = f"`bertpipe models rebuild --root {root}`"
    return f"; {root / 'runs'} holds {len(runs)} earlier runs: {rebuild} registers them again"


@models_app.command("list")
def models_list(
    root: Path = typer.Option(Path("runs/retrain"), "--root", help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per version and line."),
) -> None:
    """Every registered version, oldest first: aliases, metrics, lineage."""
    import json

    registry = _registry(root)
    try:
        versions = registry.versions(download=False)
    except ValueError as e:  # a registry that cannot be read
        fail(_one_line(e))
    if not versions:
        fail(f"the registry {registry.uri} holds no versions of {registry.name}{_runs_hint(root)}")
    if as_json:
        for v in versions:  # hf_dir left out: not fetched from a remote artifact store for a listing
            typer.echo(json.dumps({k: x for k, x in v.to_dict().items() if k != "hf_dir"}))
        return
    metric_names = sorted({name for v in versions for name in v.metrics})
    rows = [["version", "aliases", "created", *metric_names, "parent"]]
    for v in versions:
        rows.append(
            [str(v.version), ",".join(v.aliases) or "-", v.created_at.replace("+00:00", "Z")]
            + [f"{v.metrics[m]:.4g}" if m in v.metrics else "-" for m in metric_names]
            + [v.lineage.get("parent_version") or "-"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@models_app.command("show")
def models_show(
    version: int = typer.Argument(..., help="Version number."),
    root: Path = typer.Option(Path("runs/retrain"), "--root", help=ROOT_HELP),
) -> None:
    """One version as JSON: aliases, metrics, lineage, tags and the local directory of its HF export."""
    import json

    try:
        model = _registry(root).get(version)
    except ValueError as e:
        fail(_one_line(e))
    typer.echo(json.dumps(model.to_dict(), indent=2))


@models_app.command("promote")
def models_promote(
    version: int = typer.Argument(..., help="Version number."),
    reason: str = typer.Option("", "--reason", help="Why (kept as the version's tag champion_reason)."),
    root: Path = typer.Option(Path("runs/retrain"), "--root", help=ROOT_HELP),
) -> None:
    """Make VERSION the champion by hand; the champion it replaces is remembered for rollback."""
    registry = _registry(root)
    try:
        before = registry.champion()
        model = registry.promote(version, reason=reason)
    except ValueError as e:
        fail(_one_line(e))
    was = f" (was version {before.version})" if before and before.version != model.version else ""
    typer.echo(f"{registry.name} version {model.version} is champion{was}")


@models_app.command("rollback")
def models_rollback(
    reason: str = typer.Option("", "--reason", help="Why (kept as the version's tag champion_reason)."),
    root: Path = typer.Option(Path("runs/retrain"), "--root", help=ROOT_HELP),
) -> None:
    """Make the previous champion champion again."""
    registry = _registry(root)
    try:
        before = registry.champion()
        model = registry.rollback(reason=reason)
    except ValueError as e:
        fail(_one_line(e))
    typer.echo(f"{registry.name} version {model.version} is champion again (was version {before.version})")


@models_app.command("rebuild")
def models_rebuild(
    root: Path = typer.Option(Path("runs/retrain"), "--root", help=ROOT_HELP),
    force: bool = typer.Option(
        False, "--force", help="Rebuild a readable registry too (it is moved aside, never deleted)."
    ),
) -> None:
    """Register every run under ROOT/runs again (weights, figures and lineage from its run record), restoring the
    champion and the promotion history; a registry database that cannot be read is moved aside first."""
    registry = _registry(root)
    logging.getLogger("flows.registry").setLevel(logging.WARNING)  # its own lines say what each step did
    try:
        registry.rebuild(force=force, say=typer.echo)
    except ValueError as e:
        fail(_one_line(e))


if __name__ == "__main__":  # python -m flows.cli: the same commands where no `bertpipe` script is installed
    app()
