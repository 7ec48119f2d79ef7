"""BERT in plain PyTorch, read top to bottom: config, embeddings, attention, MLP, block, encoder, model.

Parameter names are those of Hugging Face `transformers` (`embeddings.word_embeddings.weight`,
`encoder.layer.0.attention.self.query.weight`, ...) so checkpoints move both ways (see `bert.model.hf`).
Shapes: B batch, T padded sequence length, N non-padding tokens of the batch, H hidden, nh heads, hd head dim.

Two speed paths differ from `transformers` only in cost, not in values:
- unpadding (`config.unpad`): the dense layers run on the N real tokens of the batch packed together; only
  attention pads them back to (B, T). With lengths uniform in [32, 128] that skips ~35% of the work.
  `config.unpad_attention="varlen"` (CUDA) keeps attention packed too: flash attention over cumulative
  sequence lengths, no pad/unpad in any layer. `packing_inputs` computes the packing on the host from the
  attention mask; passed to `forward` precomputed, no step runs `nonzero`/`tolist` on the device and the
  forward has no data-dependent branch (one graph under torch.compile).
- the task models live in `bert.model.heads`; the MLM head projects onto the vocabulary only at predicted positions.

"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bert.model import hf
from bert.model.config import ACTIVATIONS, VOCAB_SIZED_KEYS, BertConfig

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ unpadding


@dataclass
class Packing:
    """Where the N real tokens of a (B, T) batch sit, so layers can run on (N, H) and attention on (B, T)."""

    indices: torch.Tensor  # (N,) flat positions b * T + t of the non-padding tokens
    batch_size: int
    seq_len: int
    lengths: list[int] | None = None  # tokens per sequence, when attention runs sequence by sequence
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32 cumulative lengths, for varlen attention
    max_seqlen: int | None = None  # longest sequence of the batch (or a bound on it), for varlen attention
    # Fill rows (``packing_inputs(multiple_of=...)``) after the N real ones: their index is B * T, one row past
    # the batch, which reads a [PAD] token and is dropped again by ``pad``; cu_seqlens then has B + 1 + k entries.
    fill: bool = False

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C) with zeros at padding."""
        rows = self.batch_size * self.seq_len
        out = x.new_zeros(rows + int(self.fill), x.shape[-1])  # fill rows land in the extra row, cut off
        return out.index_copy(0, self.indices, x)[:rows].view(self.batch_size, self.seq_len, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C); fill rows get zeros."""
        x = x.reshape(self.batch_size * self.seq_len, -1)
        return (F.pad(x, (0, 0, 0, 1)) if self.fill else x).index_select(0, self.indices)

    def flat(self, x: torch.Tensor, fill_value: int = 0) -> torch.Tensor:
        """(B, T) -> (B * T,), with one more element (``fill_value``) for the fill rows to read."""
        x = x.reshape(-1)
        return F.pad(x, (0, 1), value=fill_value) if self.fill else x


def fill_sequences(multiple_of: int, seq_len: int) -> int:
    """How many sequences the fill rows of ``packing_inputs(multiple_of=...)`` form: the fewest k for which
    every one can be 1 to ``seq_len`` long (at most ``multiple_of + k - 1`` rows split evenly), so no sequence
    of cu_seqlens is empty and ``seq_len`` still bounds them all (the compiled model's max_seqlen)."""
    if seq_len < 2:
        raise ValueError(f"packing to a multiple of {multiple_of} needs sequences of 2 or more tokens")
    # ceil((multiple_of + k - 1) / k) <= seq_len  <=>  k >= (multiple_of - 1) / (seq_len - 1)
    return max(1, -(-(multiple_of - 1) // (seq_len - 1)))


def packing_inputs(attention_mask: torch.Tensor | np.ndarray, multiple_of: int = 0) -> dict[str, Any]:
    """The unpadding of a (B, T) 0/1 mask, computed on the host: BertModel.forward's precomputed inputs.

    ``unpad_indices`` (N,) int64 flat positions b * T + t of the tokens, ``cu_seqlens`` (B + 1,) int32
    cumulative lengths, ``max_seqlen`` an int. A collator (or the engine) calls it on CPU tensors before the
    batch moves to the device, so the device never waits on ``nonzero``/``tolist`` in a step. It computes in
    numpy: on a prefetch thread, torch's CPU operators would run a second intra-op thread pool beside the
    training thread's, and the two contend for the cores (the CPU demo's steps took 12% longer).

    ``multiple_of`` > 0 appends fill rows (index B * T: a [PAD] token at position 0, in k sequences of their
    own, ``fill_sequences``) until the packed length is a multiple of it, so batches of slightly different
    sizes share a shape (what CUDA graphs need: one graph per shape). The model drops the fill rows again;
    nothing they compute reaches the real tokens or a loss.
    """
    if torch.is_tensor(attention_mask) and attention_mask.device.type != "cpu":
        raise ValueError("packing_inputs runs on the host: pass the CPU attention mask, before .to(device)")
    mask = np.asarray(attention_mask.numpy() if torch.is_tensor(attention_mask) else attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, seq_len), got shape {tuple(mask.shape)}")
    mask = mask.astype(bool, copy=False)
    lengths = mask.sum(1)
    indices = np.flatnonzero(mask).astype(np.int64, copy=False)
    if multiple_of:
        batch, seq_len = mask.shape
        k = fill_sequences(multiple_of, seq_len)
        n = len(indices)
        fill = -(-(n + k) // multiple_of) * multiple_of - n  # k <= fill < multiple_of + k
        indices = np.concatenate([indices, np.full(fill, batch * seq_len, dtype=np.int64)])
        lengths = np.concatenate([lengths, np.full(k, fill // k) + (np.arange(k) < fill % k)])
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    return {
        "unpad_indices": torch.from_numpy(indices),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(lengths.max()) if len(lengths) else 0,
    }


def has_fill(cu_seqlens: torch.Tensor | None, batch_size: int) -> bool:
    """Whether a packing carries fill rows (``packing_inputs(multiple_of=...)``): a shape, so no graph breaks."""
    return cu_seqlens is not None and cu_seqlens.shape[0] > batch_size + 1


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Attention of packed (N, nh, hd) tokens within their sequences (PyTorch's flash varlen kernel, CUDA)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"unpad_attention='varlen' needs CUDA tensors in bf16 or fp16 (flash attention), got {q.dtype} on "
            f"{q.device}: use unpad_attention='padded' on the CPU or in fp32"
        )
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


# ------------------------------------------------------------------------------------------ embeddings


class BertEmbeddings(nn.Module):
    """Token + segment + learned absolute position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.padded_vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        # any leading shape S: (B, T) padded or (N,) packed; position_ids broadcast against it
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (*S, H)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


# ------------------------------------------------------------------------------------------- attention


class BertSelfAttention(nn.Module):
    """Multi-head self-attention; Q, K and V stay separate parameters (HF names) but run as one matmul."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.use_sdpa = config.use_sdpa
        self.varlen = config.unpad_attention == "varlen"

    def attend(self, q, k, v, key_mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v over (..., nh, T, hd), keys masked where key_mask is False."""
        dropout_p = self.dropout_p if self.training else 0.0
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (..., nh, T, T)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        return F.dropout(scores.softmax(-1), dropout_p, self.training) @ v

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, packing: Packing | None
    ) -> torch.Tensor:
        # x: (B, T, H) or packed (N, H); key_mask: (B, 1, 1, T) bool, True = attend, or None
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(x, weight, bias)  # (..., 3H)
        nh, hd = self.num_heads, self.head_dim
        if packing is not None and self.varlen:
            # dropout_p is 0 here: BertConfig refuses "varlen" with attention dropout
            q, k, v = qkv.view(-1, 3, nh, hd).unbind(1)  # each (N, nh, hd)
            return varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen).reshape(-1, nh * hd)
        if packing is not None and packing.lengths is not None:
            # one sequence at a time, no padding and no mask: the (nh, len, len) scores stay in cache
            outs = []
            for chunk in qkv.split(packing.lengths):  # views of (len, 3H)
                q, k, v = chunk.view(-1, 3, nh, hd).permute(1, 2, 0, 3)  # each (nh, len, hd)
                outs.append(self.attend(q, k, v, None).transpose(0, 1).reshape(-1, nh * hd))
            return torch.cat(outs)  # (N, H)
        if packing is not None:
            qkv = packing.pad(qkv)  # (B, T, 3H)
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        y = self.attend(q, k, v, key_mask).transpose(1, 2).reshape(B, T, -1)  # (B, T, H)
        return packing.unpad(y) if packing is not None else y


class BertSelfOutput(nn.Module):
    """Attention output projection, dropout, residual, post-LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class BertAttention(nn.Module):
    """`attention.self` + `attention.output`, nested as in transformers so parameter names match."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, key_mask, packing) -> torch.Tensor:
        return self.output(self.self(x, key_mask, packing), x)


# ------------------------------------------------------------------------------------------------- MLP


class BertIntermediate(nn.Module):
    """First MLP layer and activation: H -> intermediate_size."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    """Second MLP layer, dropout, residual, post-LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


# ----------------------------------------------------------------------------------------------- block


class BertLayer(nn.Module):
    """One post-LN encoder block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, key_mask, packing) -> torch.Tensor:
        x = self.attention(x, key_mask, packing)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack of blocks, optionally recomputed in backward (activation checkpointing)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x, key_mask, packing) -> torch.Tensor:
        for block in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, key_mask, packing, use_reentrant=False)
            else:
                x = block(x, key_mask, packing)
        return x


class BertPooler(nn.Module):
    """dense + tanh over the [CLS] (first) token."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, H) -> (B, H)


# ----------------------------------------------------------------------------------------------- model


class BertPreTrainedModel(nn.Module):
    """Shared by all BERT models: BERT initialisation and Hugging Face loading/saving."""

    config_class = BertConfig
    base_model_prefix = "bert"
    # checkpoint key -> the key it is tied to (transformers does not store the tied copy)
    tied_weights: dict[str, str] = {}

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"expected a BertConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """BERT init: N(0, initializer_range) weights, zero biases, LayerNorm (1, 0), zero [PAD] embedding."""
        std = self.config.initializer_range
        self.tie_weights()
        # the MLM decoder shares the word embeddings; initialising it as a Linear would undo the [PAD] row
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if id(module.weight) not in embedding_weights:
                    nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.zero_vocab_padding()

    def zero_vocab_padding(self) -> None:
        """Zero the rows past vocab_size (pad_vocab_to_multiple_of): no id looks them up, no logit is kept."""
        vocab = self.config.vocab_size
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith(VOCAB_SIZED_KEYS) and param.shape[0] > vocab:
                    param[vocab:].zero_()

    def tie_weights(self) -> None:
        """Re-tie shared parameters (the MLM decoder and the word embeddings); no-op by default."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any):
        """Load a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin); see bert.model.hf."""
        return hf.from_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json and model.safetensors that transformers loads; see bert.model.hf."""
        return hf.save_pretrained(self, path)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied ones once); optionally without the embedding tables."""
        params = {
            id(p): p for n, p in self.named_parameters() if not (exclude_embeddings and "embeddings" in n)
        }
        return sum(p.numel() for p in params.values())


@dataclass
class BertModelOutput:
    """What BertModel returns."""

    last_hidden_state: torch.Tensor  # (B, T, H); zeros at padding positions when config.unpad
    pooler_output: torch.Tensor | None  # (B, H) or None without a pooler


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, blocks and (optionally) the [CLS] pooler."""

    base_model_prefix = ""
    # Whether forward checks the ids' values (a read of the device: a sync per step). Pretraining turns it
    # off: its collator checks every batch on the host before the step.
    check_values: bool = True

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def packing(
        self, attention_mask, unpad_indices, cu_seqlens, max_seqlen
    ) -> tuple[torch.Tensor | None, Packing | None]:
        """The key mask (B, 1, 1, T) and the packing of the batch (None, None: no padding to skip)."""
        if attention_mask is None:
            return None, None
        B, T = attention_mask.shape
        cfg = self.config
        attention = cfg.unpad_attention if cfg.unpad else "padded"
        if unpad_indices is None:
            if torch.compiler.is_compiling():  # no data-dependent branch in a graph: padded, masked
                return attention_mask.bool()[:, None, None, :], None
            if bool(attention_mask.all()):
                return None, None
        mask = attention_mask.bool()
        key_mask = None if attention == "varlen" else mask[:, None, None, :]  # broadcast over heads, queries
        if not cfg.unpad:
            return key_mask, None
        if unpad_indices is None:
            unpad_indices = mask.view(-1).nonzero().squeeze(1)  # (N,)
            if attention == "varlen":
                lengths = mask.sum(1, dtype=torch.int32)
                cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
                max_seqlen = int(lengths.max())
        elif attention == "varlen" and cu_seqlens is None:
            raise ValueError("unpad_attention='varlen' needs cu_seqlens with unpad_indices")
        if attention == "varlen" and max_seqlen is None:
            # The padded length bounds the longest sequence, and flash attention takes any upper bound; a
            # compiled model gets this one (a size Dynamo treats as symbolic), not an int it would specialise on.
            max_seqlen = T
        fill = has_fill(cu_seqlens, B)
        lengths = None
        if attention == "per_sequence":  # the CPU path: lengths as Python ints
            lengths = [n for n in mask.sum(1).tolist() if n]
            if fill:  # the fill rows' own sequences
                lengths += cu_seqlens[B + 1 :].diff(prepend=cu_seqlens[B : B + 1]).tolist()
        return key_mask, Packing(unpad_indices, B, T, lengths, cu_seqlens, max_seqlen, fill)

    def check_inputs(self, input_ids, attention_mask, token_type_ids) -> None:
        """ValueError for inputs the embedding tables cannot take (cheap: shapes and one max())."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"({cfg.max_position_embeddings}); truncate the inputs to at most that many tokens"
            )
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}")
        if self.check_values and input_ids.numel() and not torch.compiler.is_compiling():
            # value checks read the device (a sync, and a graph break under torch.compile): eager only; the
            # compiled run's ids come from the same collator the eager runs check
            lo, hi = torch.aminmax(input_ids)
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, vocab_size={cfg.vocab_size}), got min {int(lo)} max {int(hi)}; "
                    f"the tokenizer and the model config disagree on the vocabulary"
                )
            if token_type_ids is not None and (
                token_type_ids.max() >= cfg.type_vocab_size or token_type_ids.min() < 0
            ):
                raise ValueError(f"token_type_ids must be in [0, type_vocab_size={cfg.type_vocab_size})")

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        unpad_indices=None,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> BertModelOutput:
        """input_ids (B, T) long; attention_mask (B, T) 1 = token, 0 = padding; token_type_ids (B, T).

        unpad_indices, cu_seqlens, max_seqlen: the packing of attention_mask, precomputed on the host by
        ``packing_inputs`` (optional; without them the model finds it on the device, or under torch.compile
        runs padded).
        """
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        B, T = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        position_ids = torch.arange(T, device=input_ids.device)  # (T,)
        key_mask, packing = self.packing(attention_mask, unpad_indices, cu_seqlens, max_seqlen)

        if packing is not None:
            x = self.embeddings(
                packing.flat(input_ids, self.config.pad_token_id or 0)[packing.indices],
                packing.flat(token_type_ids)[packing.indices],
                packing.flat(position_ids.repeat(B))[packing.indices],
            )  # (N, H)
            x = packing.pad(self.encoder(x, key_mask, packing))  # (B, T, H)
        else:
            x = self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), key_mask, None)
        pooled = self.pooler(x) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=x, pooler_output=pooled)
