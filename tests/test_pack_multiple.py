"""Packing to a multiple (``TrainConfig.pack_multiple_of``): fill rows give batches shared shapes and change nothing.

CUDA graphs record one graph per input shape, and a packed batch's token count and predicted-position count
change every step. Rounding both up with fill rows (``packing_inputs(multiple_of=...)``,
``find_mlm_positions(multiple_of=...)``) lets a few shapes serve a whole run; these tests hold the fill rows to
changing no loss, gradient or metric. One graph under torch.compile: ``tests/test_compile.py``; the CUDA graphs
themselves need a GPU (``tests/test_gpu.py``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_compile import TINIEST, varied_batch
from test_data import TINY, make_examples, make_vocab
from test_pretrain import read_metrics, tiny_config

from bert.model import BertConfig, BertForPreTraining
from bert.model.encoder import fill_sequences, packing_inputs
from bert.model.heads import IGNORE_INDEX, find_mlm_positions

MULTIPLES = (1, 7, 32, 100)  # 100: more fill than a 16-token sequence holds, split over several sequences


@pytest.mark.parametrize("multiple_of", MULTIPLES)
def test_packing_to_a_multiple_appends_fill_sequences_no_longer_than_the_batch(multiple_of):
    rng = np.random.default_rng(multiple_of)
    for _ in range(20):
        batch, seq_len = int(rng.integers(1, 6)), int(rng.integers(2, 17))
        mask = np.arange(seq_len)[None, :] < rng.integers(0, seq_len + 1, size=(batch, 1))
        exact, packed = packing_inputs(mask), packing_inputs(mask, multiple_of)
        n, indices, cu = len(exact["unpad_indices"]), packed["unpad_indices"], packed["cu_seqlens"]
        assert len(indices) % multiple_of == 0 and len(indices) > n
        assert torch.equal(indices[:n], exact["unpad_indices"])
        assert (indices[n:] == batch * seq_len).all()  # one row past the batch: the model's fill row
        k = fill_sequences(multiple_of, seq_len)
        assert torch.equal(cu[: batch + 1], exact["cu_seqlens"]) and len(cu) == batch + 1 + k
        fill_lengths = cu[batch:].diff()
        assert int(cu[-1]) == len(indices) and (fill_lengths >= 1).all() and (fill_lengths <= seq_len).all()
        assert packed["max_seqlen"] <= seq_len  # the padded length still bounds every sequence

        labels = torch.where(torch.from_numpy(rng.random((batch, seq_len)) < 0.3), 5, IGNORE_INDEX)
        positions, filled = find_mlm_positions(labels), find_mlm_positions(labels, multiple_of)
        assert len(filled) % multiple_of == 0 and len(filled) - len(positions) < multiple_of
        assert (
            torch.equal(filled[: len(positions)], positions)
            and (filled[len(positions) :] == labels.numel()).all()
        )


def test_a_multiple_with_one_token_sequences_is_refused():
    with pytest.raises(ValueError, match="sequences of 2 or more tokens"):
        packing_inputs(np.ones((3, 1)), multiple_of=8)


def forward_backward(model, inputs: dict, multiple_of: int):
    """The loss and gradients of ``model`` on the CPU batch ``inputs``, packed (on the host) to ``multiple_of``."""
    model.zero_grad()
    extra = packing_inputs(inputs["attention_mask"], multiple_of)
    extra["mlm_positions"] = find_mlm_positions(inputs["labels"], multiple_of)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in {**inputs, **extra}.items()}
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("attention", ["padded", "per_sequence"])
@pytest.mark.parametrize("multiple_of", MULTIPLES[1:])
def test_fill_rows_change_no_loss_gradient_or_prediction(attention, multiple_of):
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**{**TINIEST, "unpad_attention": attention})).train()
    inputs = varied_batch(1, 16, [16, 9, 5, 14], [0, 2, 4])
    exact, exact_grads = forward_backward(model, inputs, 0)
    out, grads = forward_backward(model, inputs, multiple_of)
    torch.testing.assert_close(out.loss, exact.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.nsp_logits, exact.nsp_logits, rtol=1e-5, atol=1e-6)
    real = out.mlm_labels != IGNORE_INDEX
    assert int(real.sum()) == len(exact.mlm_labels) and not real[len(exact.mlm_labels) :].any()
    torch.testing.assert_close(out.mlm_logits[real], exact.mlm_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == exact_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, exact_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_varlen_sequences_with_fill_give_the_exact_packings_attention(monkeypatch):
    """The varlen path (flash attention over cu_seqlens, CUDA only) with a reference kernel on the CPU: the fill
    sequences appended to cu_seqlens leave every real sequence's attention as it was."""
    from bert.model import encoder

    def reference_varlen(q, k, v, cu_seqlens, max_seqlen):  # (N, nh, hd) each, attention within each sequence
        spans = list(itertools.pairwise(cu_seqlens.tolist()))
        assert spans[-1][1] == len(q) and max(b - a for a, b in spans) <= max_seqlen
        outs = [torch.nn.functional.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)))
                for a, b in spans]  # fmt: skip
        return torch.cat([o.transpose(0, 1) for o in outs])

    monkeypatch.setattr(encoder, "varlen_attention", reference_varlen)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**{**TINIEST, "unpad_attention": "varlen"})).train()
    inputs = varied_batch(1, 16, [16, 9, 5, 14], [0, 2, 4])
    exact, exact_grads = forward_backward(model, inputs, 0)
    for multiple_of in (7, 100):
        out, grads = forward_backward(model, inputs, multiple_of)
        torch.testing.assert_close(out.loss, exact.loss, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, exact_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_run_packed_to_a_multiple_trains_and_logs_as_an_exact_one(tmp_path):
    """Through the rank's loop (prefetch thread, engine, metrics, evaluation): the same losses, accuracies and
    token counts with fill rows as without (dropout off: the fill rows would change only its random draws)."""
    from bert.pretrain.rank import main

    vocab = make_vocab(tmp_path / "vocab")
    examples = make_examples(tmp_path / "examples", vocab, num_train=32, num_valid=8)
    no_dropout = {**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    runs = {}
    for multiple_of in (0, 24):
        out = tmp_path / f"run-{multiple_of}"
        main(tiny_config(examples, out, model_overrides=no_dropout, max_steps=4, eval_every=4,
                         pack_multiple_of=multiple_of))  # fmt: skip
        runs[multiple_of] = read_metrics(out)
    exact, packed = runs[0], runs[24]
    assert [r["step"] for r in packed] == [r["step"] for r in exact] and len(exact) >= 5
    for ours, theirs in zip(packed, exact, strict=True):
        for key in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "eval_loss", "eval_mlm_acc"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (ours["step"], key)
        assert ours.get("tokens") == theirs.get("tokens")


@pytest.mark.parametrize("deepspeed", ["zero1_bf16", "zero2_fp32"])
def test_accumulated_steps_packed_to_a_multiple_train_as_a_plain_loop(deepspeed):
    """Three clipped steps of 2 micro batches each, fill rows in every one: the plain loop's losses and norms."""
    from test_zero_stages import against_a_plain_loop

    got, expected = against_a_plain_loop(deepspeed, steps=3, micro=2, clip=1.0, pack_multiple_of=16)
    tolerance = 2e-2 if "bf16" in deepspeed else 1e-5
    for step, ((loss, norm), (plain_loss, plain_norm)) in enumerate(zip(got, expected, strict=True)):
        assert loss == pytest.approx(plain_loss, rel=tolerance), step
        assert norm == pytest.approx(plain_norm, rel=tolerance), step


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"compile_options": {"triton.cudagraphs": True}}, "set pack_multiple_of too"),
        ({"pack_multiple_of": -8}, "pack_multiple_of must be >= 0"),
    ],
)
def test_cuda_graphs_without_packing_to_a_multiple_are_refused(settings, message):
    from bert.pretrain.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(examples="e", out="o", max_steps=1, **settings)
    TrainConfig(
        examples="e", out="o", max_steps=1, pack_multiple_of=1024, compile_options={"triton.cudagraphs": True}
    )


def test_packing_to_a_multiple_is_not_part_of_the_stage_fingerprint():
    from bert.pretrain.config import TrainConfig
    from bert.pretrain.stage import NOT_IN_FINGERPRINT

    assert "pack_multiple_of" in NOT_IN_FINGERPRINT
    assert TrainConfig(examples="e", out="o", max_steps=1).pack_multiple_of == 0


def test_cuda_graphs_that_inductor_skipped_are_reported(monkeypatch):
    """Inductor logs why it skips CUDA graphs only under TORCH_LOGS=cudagraphs: the run says that it did."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from bert.pretrain.engine import Engine

    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", 0)
    asked = SimpleNamespace(cuda_graphs=True, device="cuda:0")
    assert Engine.cuda_graph_warning(asked) is None  # every graph recorded
    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", 2)
    assert (
        "ran 2 compiled graph(s) without them (TORCH_LOGS=cudagraphs shows why)"
        in Engine.cuda_graph_warning(asked)
    )
    assert "the CPU has none" in Engine.cuda_graph_warning(SimpleNamespace(cuda_graphs=True, device="cpu"))
    assert Engine.cuda_graph_warning(SimpleNamespace(cuda_graphs=False, device="cuda:0")) is None  # not asked
