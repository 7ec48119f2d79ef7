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
