"""The `bertpipe` command line: one command per stage, each a thin call of the stage's function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="bertpipe",
    help="BERT pretraining pipeline: shard → vocab → examples → pretrain → finetune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def default_shared() -> Path:
    """Where the sample data lives: $BERTPIPE_SHARED, else ../shared beside the checkout."""
    return Path(os.environ.get("BERTPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def fail(message: str) -> None:
    """Report a user mistake in one line and exit 2 (never a traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


# Stage commands are added below, one block each.


# --- shard -------------------------------------------------------------------------------------------------
@app.command()
def shard(
    input: list[str] = typer.Option(..., "--input", help="File, dir, saved dataset, hf://NAME[:CONFIG]."),
    out: Path = typer.Option(..., "--out", help="Stage directory to write."),
    num_shards: int = typer.Option(..., "--num-shards", help="Parquet parts per split."),
    doc_boundary: str = typer.Option("blank-line", "--doc-boundary", help="Plain text: blank-line or file."),
    valid_fraction: float = typer.Option(0.01, "--valid-fraction", help="Share of documents for validation."),
    seed: int = typer.Option(0, "--seed", help="Mixed into the shard/split placement hash."),
    workers: int = typer.Option(1, "--workers", help="Processes; the output does not depend on it."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of JSONL/Parquet/HF inputs."),
    language: str = typer.Option("en", "--language", help="Sentence splitter language code."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the stage is complete."),
) -> None:
    """Raw text/JSONL/Parquet/HF datasets → sentence-split documents in N Parquet shards."""
    from data_prep.manifest import StageError
    from data_prep.shard import ShardConfig, shard_corpus

    try:
        config = ShardConfig(
            inputs=input,
            out=str(out),
            num_shards=num_shards,
            doc_boundary=doc_boundary,
            valid_fraction=valid_fraction,
            seed=seed,
            workers=workers,
            text_field=text_field,
            language=language,
            force=force,
        )
        manifest = shard_corpus(config)
    except (StageError, ValueError) as e:
        fail(str(e))
    stats = manifest["stats"]
    typer.echo(
        f"{out}: {stats['documents']} documents, {stats['sentences']} sentences, {stats['words']} words "
        f"({stats['splits']['valid']['documents']} valid)"
    )


# --- vocab -------------------------------------------------------------------------------------------------
@app.command()
def vocab(
    corpus: Path = typer.Option(..., "--corpus", help="A finished shard stage directory."),
    out: Path = typer.Option(..., "--out", help="Stage directory to write."),
    vocab_size: int = typer.Option(30522, "--vocab-size", help="Tokens, special tokens included."),
    lowercase: bool = typer.Option(True, "--lowercase/--cased", help="Uncased (BERT-uncased) or cased."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Minimum count of a merge."),
    from_path: str | None = typer.Option(None, "--from", help="Adopt this vocab.txt or tokenizer dir."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the stage is complete."),
) -> None:
    """WordPiece vocabulary trained on the corpus's train split (or adopted with --from)."""
    from data_prep.manifest import StageError
    from data_prep.vocab import VocabConfig, train_vocab

    try:
        config = VocabConfig(
            corpus=str(corpus),
            out=str(out),
            vocab_size=vocab_size,
            lowercase=lowercase,
            min_frequency=min_frequency,
            from_path=from_path,
            force=force,
        )
        manifest = train_vocab(config)
    except (StageError, ValueError) as e:
        fail(str(e))
    stats = manifest["stats"]
    typer.echo(
        f"{out}: {stats['vocab_size']} tokens; {stats['stats_split']} split: UNK rate {stats['unk_rate']:.4%}, "
        f"{stats['tokens_per_word']:.3f} tokens per word"
    )


# --- examples ----------------------------------------------------------------------------------------------
@app.command()
def examples(
    corpus: Path = typer.Option(..., "--corpus", help="A finished `bertpipe shard` directory."),
    vocab: Path = typer.Option(..., "--vocab", help="Vocab stage, tokenizer dir or vocab.txt."),
    out: Path = typer.Option(..., "--out", help="Stage directory to write."),
    max_seq_length: int = typer.Option(..., "--max-seq-length", help="Tokens per example (L)."),
    masking: str = typer.Option("static", "--masking", help="static or dynamic."),
    dupe_factor: int = typer.Option(1, "--dupe-factor", help="Passes over the corpus."),
    masked_lm_prob: float = typer.Option(0.15, "--masked-lm-prob", help="Share of tokens to predict."),
    max_predictions_per_seq: int = typer.Option(
        None, "--max-predictions-per-seq", help="Cap per example (default round(L * prob))."
    ),
    short_seq_prob: float = typer.Option(0.1, "--short-seq-prob", help="Share of shorter target lengths."),
    whole_word_mask: bool = typer.Option(False, "--whole-word-mask", help="Mask all pieces of a word."),
    seed: int = typer.Option(12345, "--seed", help="Random seed."),
    workers: int = typer.Option(1, "--workers", help="Processes; the output does not depend on it."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Token cache (default beside --out)."),
) -> None:
    """Corpus shards + vocabulary → MLM/NSP examples (Arrow IPC), Google's algorithm, streaming."""
    from data_prep.examples_stage import ExamplesConfig, generate_examples
    from data_prep.manifest import StageError

    try:
        config = ExamplesConfig(
            corpus=corpus,
            vocab=vocab,
            out=out,
            max_seq_length=max_seq_length,
            masking=masking,
            dupe_factor=dupe_factor,
            masked_lm_prob=masked_lm_prob,
            max_predictions_per_seq=max_predictions_per_seq,
            short_seq_prob=short_seq_prob,
            whole_word_mask=whole_word_mask,
            seed=seed,
            workers=workers,
            cache_dir=cache_dir,
        )
        manifest = generate_examples(config)
    except (StageError, ValueError) as e:
        fail(str(e))
    stats = manifest["stats"]
    typer.echo(
        f"{out}: {stats['examples']} examples, {stats['tokens']} tokens, "
        f"NSP random {stats['nsp_random_next_share']:.3f}, truncated {stats['truncated_share']:.3f}"
    )
