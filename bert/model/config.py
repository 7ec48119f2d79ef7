"""The model's configuration: sizes, presets and the names of config.json, as in transformers' BertConfig."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch.nn.functional as F

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- config

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf GELU, as BERT and transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
RUNTIME_SWITCHES = {
    "use_sdpa",
    "unpad",
    "unpad_attention",
    "gradient_checkpointing",
    "pad_vocab_to_multiple_of",
}  # not in config.json: how to compute, not what
UNPAD_ATTENTION = ("padded", "per_sequence", "varlen")
# Parameters with one row per vocabulary id (checkpoint key suffixes): padded inside the model when
# pad_vocab_to_multiple_of > 1, cut back to vocab_size in every Hugging Face export.
VOCAB_SIZED_KEYS = (
    "embeddings.word_embeddings.weight",
    "predictions.bias",
    "predictions.decoder.weight",
    "predictions.decoder.bias",
)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# name: (num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)
PRESETS = {
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "medium": (8, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}

# Keys of transformers' config.json that we accept but do not need; anything else unknown is logged.
_HF_IGNORED_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "gradient_checkpointing", "position_embedding_type", "is_decoder",
    "add_cross_attention", "model_type", "architectures", "num_labels",
}  # fmt: skip


@dataclass
class BertConfig:
    """Architecture of a BERT encoder (fields and defaults as transformers' BertConfig, i.e. bert-base)."""

    vocab_size: int = 30522
    """WordPiece vocabulary size; token ids must be below it."""
    hidden_size: int = 768
    """Width H of every token representation."""
    num_hidden_layers: int = 12
    """Number of encoder blocks."""
    num_attention_heads: int = 12
    """Attention heads per block; must divide hidden_size."""
    intermediate_size: int = 3072
    """Width of the MLP inside each block (4 H in every published BERT)."""
    hidden_act: str = "gelu"
    """MLP activation; "gelu" is the exact erf GELU of the original BERT."""
    hidden_dropout_prob: float = 0.1
    """Dropout on embeddings and on every residual branch."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention probabilities."""
    max_position_embeddings: int = 512
    """Longest sequence the learned position table covers."""
    type_vocab_size: int = 2
    """Number of segment (token type) ids: 2 for A/B sentence pairs."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's 1e-12, not PyTorch's 1e-5)."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of Linear and Embedding weights."""
    pad_token_id: int | None = 0
    """Id of [PAD]; its embedding row starts at zero."""
    classifier_dropout: float | None = None
    """Dropout before classification heads; None means hidden_dropout_prob."""
    num_labels: int = 2
    """Outputs of the classification heads (1 means regression for sequence classification)."""
    id2label: dict[int, str] | None = None
    """Label names by index; defaults to LABEL_0 ... LABEL_{num_labels-1}."""
    label2id: dict[str, int] | None = None
    """Inverse of id2label; derived when not given."""
    problem_type: str | None = None
    """Sequence classification loss: None picks MSE for num_labels == 1, cross-entropy otherwise."""
    architectures: list[str] | None = None
    """Class names written to config.json (set by save_pretrained)."""
    # Runtime switches: how to compute, not what. Not written to config.json.
    use_sdpa: bool = True
    """Attention through torch.nn.functional.scaled_dot_product_attention (False: explicit softmax)."""
    unpad: bool = True
    """Run the dense layers on non-padding tokens only (same values, less work when there is padding)."""
    unpad_attention: str = "padded"
    """With unpad, how attention sees the packed tokens: "padded" (scatter back to (B, T) and mask: one kernel
    per layer) or "per_sequence" (a loop over sequences at exact lengths, no mask: ~8% faster per step on one
    idle CPU thread, but B times more kernels, which costs far more when the cores are contended) or "varlen"
    (CUDA, bf16/fp16: PyTorch's flash-attention kernel over the packed (N, H) tokens with cumulative lengths,
    no padding and no mask in any layer; it has no attention dropout, so it needs
    attention_probs_dropout_prob=0, MosaicBERT's setting). "padded" is the reference the others must equal."""
    pad_vocab_to_multiple_of: int = 1
    """Give the word embeddings and the MLM decoder this multiple of rows (64: tensor-core aligned GEMMs on the
    GPU); the extra rows stay zero, MLM logits are cut back to vocab_size, and Hugging Face exports hold
    vocab_size rows, as if never padded. A DeepSpeed checkpoint only resumes with the same value."""
    gradient_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint) to save activation memory."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}); change one of them (e.g. 64-wide heads: "
                f"num_attention_heads={max(1, self.hidden_size // 64)})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("layer_norm_eps and initializer_range must be > 0")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})"
            )
        if self.unpad_attention not in UNPAD_ATTENTION:
            raise ValueError(
                f"unpad_attention must be one of {UNPAD_ATTENTION}, got {self.unpad_attention!r}"
            )
        if self.unpad_attention == "varlen" and self.attention_probs_dropout_prob:
            raise ValueError(
                f"unpad_attention='varlen' (flash attention over packed tokens) has no attention dropout, but "
                f"attention_probs_dropout_prob is {self.attention_probs_dropout_prob}: set it to 0 (MosaicBERT's "
                f"choice) to use 'varlen', or keep unpad_attention='padded'"
            )
        multiple = self.pad_vocab_to_multiple_of
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(
                f"pad_vocab_to_multiple_of must be a positive integer (1: no padding), got {multiple!r}"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not one of {PROBLEM_TYPES} (or None)")
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ValueError(
                f"id2label has keys {sorted(self.id2label)} but num_labels is {self.num_labels}; give "
                f"id2label exactly the keys 0..num_labels-1 (or leave it out)"
            )
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        if {int(v): k for k, v in self.label2id.items()} != self.id2label:
            raise ValueError(f"label2id {self.label2id} is not the inverse of id2label {self.id2label}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the word embeddings and the MLM decoder: vocab_size rounded up to pad_vocab_to_multiple_of."""
        return -(-self.vocab_size // self.pad_vocab_to_multiple_of) * self.pad_vocab_to_multiple_of

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertConfig:
        """A named size (tiny, mini, small, medium, base, large) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {list(PRESETS)}")
        layers, hidden, heads, ffn = PRESETS[name]
        sizes = dict(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn
        )
        return cls(**{**sizes, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> BertConfig:
        """Build from a transformers config.json dict; refuses configs of other model types."""
        model_type = data.get("model_type")
        architectures = data.get("architectures") or []
        if model_type != "bert" and not (
            model_type is None and any(a.startswith("Bert") for a in architectures)
        ):
            raise ValueError(
                f"config.json describes a {model_type!r} model (architectures {architectures}); "
                f"bertpipe loads BERT checkpoints only (model_type 'bert')"
            )
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {data['position_embedding_type']!r} is not supported; only 'absolute'"
            )
        if data.get("is_decoder") or data.get("add_cross_attention"):
            raise ValueError(
                "decoder / cross-attention BERT configs are not supported (is_decoder must be false)"
            )
        known = {f.name for f in fields(cls)} - RUNTIME_SWITCHES
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = sorted(set(data) - known - _HF_IGNORED_KEYS)
        if unknown:
            logger.info("config.json keys ignored by bertpipe: %s", unknown)
        if kwargs.get("id2label") is not None and "num_labels" not in overrides:
            kwargs["num_labels"] = len(kwargs["id2label"])
        if "num_labels" in overrides and "id2label" not in overrides:
            kwargs.pop("id2label", None)  # a new label count replaces the checkpoint's label names
            kwargs.pop("label2id", None)
        return cls(**{**kwargs, **overrides})

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> BertConfig:
        """Read a Hugging Face config.json (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON model config: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} is not a JSON model config (a JSON object)")
        return cls.from_dict(values, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict transformers reads (runtime switches left out)."""
        out: dict[str, Any] = {"architectures": self.architectures, "model_type": "bert"}
        for f in fields(self):
            if f.name != "architectures" and f.name not in RUNTIME_SWITCHES:
                out[f.name] = getattr(self, f.name)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out.update(position_embedding_type="absolute", tie_word_embeddings=True, is_decoder=False)
        return out

    def to_json_file(self, path: str | Path) -> None:
        """Write config.json (path may be a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
