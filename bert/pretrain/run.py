"""The contract both sides of a pretraining run read: run-directory names, the result, input resolution.

The parent (``bert.pretrain.launch``, ``bert.pretrain.stage``) and every rank (``bert.pretrain.rank``) import
this module, never each other: what a run directory holds, what a run returns, and the checks that examples,
tokenizer and model agree, run on the parent before any rank starts and again on each rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bert.model import BertConfig
from bert.pretrain.config import BatchSizes, TrainConfig
from bert.pretrain.data import Collator, ExampleShards, RankBatches, open_split, vocab_dir_of
from data_prep.manifest import StageError
from data_prep.schema import ExampleMetadata, special_ids_of, vocab_fingerprint
from data_prep.vocab import load_vocab

if TYPE_CHECKING:  # the rank side's engine: named here, never imported by the parent
    from bert.pretrain.engine import Engine

CHECKPOINTS = "checkpoints"
STATE_FILE = "bertpipe_state.json"  # rank 0 writes it once every rank has saved: the checkpoint is complete
LATEST = "latest"  # checkpoints/latest: the newest complete checkpoint's tag, written after its STATE_FILE
PARENT_PID_ENV = "BERTPIPE_PARENT_PID"  # set by the launcher: the ranks stop when that process dies
PARENT_HOST_ENV = "BERTPIPE_PARENT_HOST"  # beside it: a pid names a process on one host only


@dataclass
class PretrainResult:
    """What a run did: where it stopped and why, its last metrics, its checkpoint and export."""

    out: str
    step: int
    stop_reason: str  # max_steps | time_budget | sigterm
    metrics: dict = field(default_factory=dict)
    eval_metrics: dict | None = None
    checkpoint: str | None = None
    hf_dir: str | None = None
    device: str | None = None  # where rank 0 trained: "cuda:0", "cpu"


@dataclass
class Run:
    """Everything ``fit`` needs, built by ``main``."""

    config: TrainConfig
    out: Path
    rank: int
    world_size: int
    batch: BatchSizes
    model_config: BertConfig
    metadata: ExampleMetadata
    vocab_dir: Path
    tokens: list[str]
    train: ExampleShards
    valid: ExampleShards | None
    collator: Collator
    engine: Engine | None = None
    batches: RankBatches | None = None


# --- setup: what the examples, tokenizer and model must agree on --------------------------------------


def build_model_config(spec: str, metadata: ExampleMetadata, overrides: dict) -> BertConfig:
    """A preset (vocabulary size and [PAD] from the examples) or an HF config.json, plus overrides."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_dir() or path.exists():
        if not (path / "config.json" if path.is_dir() else path).exists():
            raise ValueError(f"model config {spec} does not exist: give a preset name or an HF config.json")
        return BertConfig.from_json_file(path, **overrides)
    sizes = {"vocab_size": metadata.vocab_size, "pad_token_id": metadata.special_ids.get("pad", 0)}
    return BertConfig.preset(spec, **{**sizes, **overrides})


def agreement_problems(
    metadata: ExampleMetadata, model_config: BertConfig, tokens: list[str], where_tokens: str
) -> list[str]:
    """Every way the examples disagree with the tokenizer and the model (empty when they agree)."""
    problems = metadata.mismatches(
        vocab_size=model_config.vocab_size,
        special_ids=special_ids_of(tokens),
        max_position_embeddings=model_config.max_position_embeddings,
        vocab_fingerprint=vocab_fingerprint(tokens),
    )
    if len(tokens) > model_config.vocab_size:
        problems.append(
            f"the tokenizer {where_tokens} has {len(tokens)} ids, the model only {model_config.vocab_size}"
        )
    pad = metadata.special_ids.get("pad")
    if model_config.pad_token_id is not None and pad is not None and model_config.pad_token_id != pad:
        problems.append(
            f"[PAD] is id {pad} in the examples, the model's pad_token_id is {model_config.pad_token_id}"
        )
    return problems


def resolve_init(init_from: str) -> Path:
    """The HF directory to start from: the directory itself, or a run directory's hf/ export."""
    path = Path(init_from)
    for candidate in (path, path / "hf"):
        if (candidate / "config.json").exists():
            return candidate
    raise ValueError(
        f"--init-from {init_from} is neither a Hugging Face directory (config.json + weights) nor a "
        "pretraining run directory with an hf/ export"
    )


def load_run_inputs(config: TrainConfig, rank: int, world_size: int) -> Run:
    """Open the shards and check examples, tokenizer and model agree; ValueError listing every mismatch."""
    batch = config.batch_sizes(world_size)
    train = open_split(config.examples, "train")
    if train is None:
        raise ValueError(f"{config.examples} has no train/*.arrow shards")
    valid = open_split(config.examples, "valid")
    metadata = train.metadata
    if valid is not None and not valid.metadata.compatible(metadata):
        raise ValueError(f"{config.examples}: the valid shards' metadata differs from the train shards'")
    vocab_dir = Path(config.vocab) if config.vocab else vocab_dir_of(config.examples, metadata)
    if vocab_dir is None:
        raise ValueError(
            f"the examples manifest in {config.examples} does not record its vocabulary: pass --vocab DIR "
            "(the vocab stage directory the examples were made with)"
        )
    # load_vocab checks the files against their stage's manifest: a changed vocab.txt would shift every id.
    tokens = load_vocab(vocab_dir).tokens
    if vocab_dir.is_file():
        vocab_dir = vocab_dir.parent
    problems: list[str] = []
    if config.init_from:
        init_dir = resolve_init(config.init_from)
        model_config = BertConfig.from_json_file(init_dir, **config.model_overrides)
        problems += agreement_problems(metadata, model_config, tokens, f"at {vocab_dir}")
        if any((init_dir / name).exists() for name in ("vocab.txt", "tokenizer.json")):
            init_tokens = load_vocab(init_dir).tokens
            if vocab_fingerprint(init_tokens) != vocab_fingerprint(tokens):
                problems.append(
                    f"--init-from {init_dir} was trained with another vocabulary than {vocab_dir}"
                )
    else:
        model_config = build_model_config(config.model_config, metadata, config.model_overrides)
        problems += agreement_problems(metadata, model_config, tokens, f"at {vocab_dir}")
    if problems:
        raise ValueError(
            f"the examples in {config.examples} do not match the model and tokenizer; nothing was trained:\n  - "
            + "\n  - ".join(problems)
        )
    collator = Collator(
        metadata, config.seed, config.pad_to_multiple_of, tokens, model_config.type_vocab_size
    )
    return Run(config, Path(config.out), rank, world_size, batch, model_config, metadata, vocab_dir, tokens,
               train, valid, collator)  # fmt: skip


def holds_checkpoints(out: str | Path) -> bool:
    """Whether ``out`` holds checkpoints, complete or cut short (``latest``, or any ``step-N`` directory)."""
    checkpoint_dir = Path(out) / CHECKPOINTS
    return (checkpoint_dir / LATEST).exists() or bool(_step_directories(checkpoint_dir))


def refuse_existing_checkpoints(out: str | Path) -> None:
    """Refuse a fresh start in ``out`` when it already holds checkpoints: continuing them needs --resume.

    The parent checks before any rank starts (``launch``, ``stage``), each rank again before it trains."""
    if holds_checkpoints(out):
        raise StageError(
            f"{out} already holds checkpoints: pass --resume to continue that run, or choose a new --out"
        )


def _step_directories(checkpoint_dir: Path) -> list[Path]:
    """The ``step-N`` directories, complete or not, oldest first."""
    found = [p for p in checkpoint_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def checkpoint_tags(checkpoint_dir: Path) -> list[str]:
    """Tags of the complete checkpoints (those with their STATE_FILE), oldest first."""
    return [p.name for p in _step_directories(Path(checkpoint_dir)) if (p / STATE_FILE).exists()]


def newest_checkpoint(checkpoint_dir: Path) -> tuple[str | None, str | None]:
    """(the newest complete checkpoint's tag or None, why it is not simply the one ``latest`` names or None).

    bertpipe writes ``latest`` after the checkpoint's STATE_FILE, so a save cut short leaves it naming the
    previous one; DeepSpeed's own ``latest`` (runs from before) was rewritten in place before the state file,
    so a kill could leave it empty or naming a checkpoint that never got its state file.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tags = checkpoint_tags(checkpoint_dir)
    newest = tags[-1] if tags else None
    pointer, latest = checkpoint_dir / LATEST, f"{CHECKPOINTS}/{LATEST}"
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    torn = [p.name for p in _step_directories(checkpoint_dir) if not (p / STATE_FILE).exists()]
    torn = [t for t in torn if newest is None or int(t[5:]) > int(newest[5:])]
    cut_short = f"has no {STATE_FILE}: its save was cut short"
    if named is None or named == newest:
        why = f"{torn[-1]} {cut_short}" if torn else None
        if named is None and newest is not None:
            why = f"{latest} is missing" + (f" and {why}" if why else "")
    elif not named:
        why = f"{latest} is empty"
    elif not (checkpoint_dir / named).is_dir():
        why = f"{latest} names {named}, which does not exist"
    elif not (checkpoint_dir / named / STATE_FILE).exists():
        why = f"{latest} names {named}, which {cut_short}"
    else:
        why = f"{latest} names {named}, older than the complete {newest}"
    return newest, why
