"""Hugging Face format: load and save `config.json` + `model.safetensors` the way `transformers` does.

Loading accepts keys with or without the `bert.` prefix (a BertModel checkpoint into a task model and back),
old TensorFlow-converted names (`LayerNorm.gamma/beta`), sharded safetensors and `pytorch_model.bin`
(read with `weights_only=True`: never unpickle arbitrary objects). Only this module touches files; the
model classes expose it as `Cls.from_pretrained(dir)` / `model.save_pretrained(dir)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bert.model.config import VOCAB_SIZED_KEYS

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_WEIGHTS_NAME = "pytorch_model.bin"
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, PYTORCH_WEIGHTS_NAME)  # a Hugging Face directory holds one of them
BACKBONE_PARTS = ("embeddings.", "encoder.", "pooler.")
# buffers some checkpoints carry; they are not parameters and we recompute them
IGNORED_CHECKPOINT_KEYS = {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    path = Path(path)
    if (path / SAFE_WEIGHTS_NAME).is_file():
        return load_file(path / SAFE_WEIGHTS_NAME)
    if (path / SAFE_WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((path / SAFE_WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(path / shard))
        return state
    if (path / PYTORCH_WEIGHTS_NAME).is_file():
        return torch.load(path / PYTORCH_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no weights in {path}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {PYTORCH_WEIGHTS_NAME}"
    )


def canonical_key(key: str) -> str:
    """Checkpoint key in the task-model form: `bert.` prefix on backbone keys, modern LayerNorm names."""
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return "bert." + key if key.startswith(BACKBONE_PARTS) else key


def from_pretrained(cls, path: str | Path, *, ignore_mismatched_sizes: bool = False, **config_overrides: Any):
    """Build `cls` from a Hugging Face directory; config_overrides replace config.json fields (e.g. num_labels).

    Missing and unexpected keys are logged; task-head parameters absent from the checkpoint are newly
    initialised with a warning naming them. A parameter whose shape differs raises ValueError, unless
    ignore_mismatched_sizes, which re-initialises it instead (a classifier with a different label count).
    The model is returned in eval mode, as transformers does; `model.loading_info` lists what happened.
    """
    path = Path(path)
    config = cls.config_class.from_json_file(path, **config_overrides)
    model = cls(config)
    checkpoint = {canonical_key(k): v for k, v in load_state_dict(path).items()}

    # our parameter name -> its name in the canonical (task-model) form
    own_prefix = f"{model.base_model_prefix}." if model.base_model_prefix else "bert."
    params = dict(model.state_dict(keep_vars=True))
    to_canonical = {k: (k if model.base_model_prefix else own_prefix + k) for k in params}
    tied = {to_canonical.get(k, k): v for k, v in model.tied_weights.items()}
    for copy, source in tied.items():  # a tied copy is a fallback for its source, never loaded twice
        if copy in checkpoint and source not in checkpoint:
            checkpoint[source] = checkpoint[copy]
        checkpoint.pop(copy, None)

    expected = {c: k for k, c in to_canonical.items() if c not in tied}
    missing = sorted(c for c in expected if c not in checkpoint)
    unexpected = sorted(c for c in checkpoint if c not in expected and c not in IGNORED_CHECKPOINT_KEYS)
    mismatched = []
    with torch.no_grad():
        for canonical, name in expected.items():
            if canonical not in checkpoint:
                continue
            tensor, param = checkpoint[canonical], params[name]
            if _is_vocab_padding(canonical, tensor, param, config):
                param[: config.vocab_size].copy_(tensor)  # the padding rows stay zero (init_weights)
                continue
            if tensor.shape != param.shape:
                if not ignore_mismatched_sizes:
                    raise ValueError(
                        f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}; "
                        f"fix config.json or the overrides (vocab_size, hidden_size, num_labels, ...) or pass "
                        f"ignore_mismatched_sizes=True to re-initialise it"
                    )
                mismatched.append((name, tuple(tensor.shape), tuple(param.shape)))
                continue
            param.copy_(tensor)

    name_of = {c: k for k, c in to_canonical.items()}
    backbone_missing = [name_of[c] for c in missing if c.startswith("bert.")]
    head_missing = [name_of[c] for c in missing if not c.startswith("bert.")]
    if unexpected:
        logger.warning("%s: checkpoint weights not used by %s: %s", path, cls.__name__, unexpected)
    if backbone_missing:
        logger.warning(
            "%s: encoder weights missing from checkpoint, randomly initialised: %s", path, backbone_missing
        )
    if head_missing:
        logger.warning(
            "%s: newly initialised %s head parameters (not in checkpoint; train before use): %s",
            path,
            cls.__name__,
            head_missing,
        )
    if mismatched:
        logger.warning(
            "%s: re-initialised because of shape mismatch (checkpoint, model): %s", path, mismatched
        )
    model.tie_weights()
    model.loading_info = {
        "missing_keys": backbone_missing + head_missing,
        "unexpected_keys": unexpected,
        "mismatched_keys": mismatched,
    }
    return model.eval()


def _is_vocab_padding(key: str, tensor: torch.Tensor, param: torch.Tensor, config) -> bool:
    """True when ``param`` is ``tensor``'s vocabulary-sized parameter padded to ``config.padded_vocab_size``."""
    return (
        key.endswith(VOCAB_SIZED_KEYS)
        and tensor.shape[1:] == param.shape[1:]
        and (tensor.shape[0], param.shape[0]) == (config.vocab_size, config.padded_vocab_size)
        and config.padded_vocab_size > config.vocab_size
    )


def save_pretrained(model, path: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` (tied copies left out, as transformers does); returns path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config, architectures=[type(model).__name__])
    config.to_json_file(path / "config.json")
    vocab = model.config.vocab_size
    state = {
        # the vocabulary rows only: an export is the same with or without pad_vocab_to_multiple_of
        k: (v[:vocab] if k.endswith(VOCAB_SIZED_KEYS) else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k not in model.tied_weights
    }
    tmp = path / f".{SAFE_WEIGHTS_NAME}.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path / SAFE_WEIGHTS_NAME)  # a reader never sees half a file
    return path
