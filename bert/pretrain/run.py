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
STATE_FILE = "bertpipe_state.json"
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
    collator = Collator(metadata, config.seed, config.pad_to_multiple_of, tokens)
    return Run(config, Path(config.out), rank, world_size, batch, model_config, metadata, vocab_dir, tokens,
               train, valid, collator)  # fmt: skip


def refuse_existing_checkpoints(out: str | Path) -> None:
    """Refuse a fresh start in ``out`` when it already holds checkpoints: continuing them needs --resume.

    The parent checks before any rank starts (``launch``, ``stage``), each rank again before it trains."""
    if (Path(out) / CHECKPOINTS / "latest").exists():
        raise StageError(
            f"{out} already holds checkpoints: pass --resume to continue that run, or choose a new --out"
        )


def checkpoint_tags(checkpoint_dir: Path) -> list[str]:
    """Tags of the saved checkpoints, oldest first."""
    tags = [p.name for p in checkpoint_dir.glob("step-*") if (p / STATE_FILE).exists()]
    return sorted(tags, key=lambda t: int(t.split("-")[1]))
