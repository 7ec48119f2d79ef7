"""BertModel and task models: number-for-number parity with transformers on tiny configs, init, bad input."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from bert import (  # noqa: E402
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

TOL = 1e-5
VOCAB = 97


def tiny_config(**overrides) -> BertConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return BertConfig(**{**kw, "max_position_embeddings": 64, "type_vocab_size": 2, **overrides})


def randomise(model, seed=0):
    """Weights large enough that every detail shows (init's N(0, 0.02) makes GELU nearly linear)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "LayerNorm.weight" in name else 0.2 * noise)
    return model


def hf_twin(ours, hf_cls, attn="eager"):
    """The transformers model of the same class with our (randomised) weights loaded strictly."""
    randomise(ours)
    cfg = transformers.BertConfig(**ours.config.to_dict(), attn_implementation=attn)
    theirs = hf_cls(cfg).eval()
    result = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return theirs


def batch(seed=0, batch_size=4, seq_len=24):
    """Ids, a padded attention mask (one row full, others shorter), segments, MLM labels and NSP labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch_size, seq_len), generator=g)
    lengths = torch.tensor([seq_len, 17, 9, 13][:batch_size])
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # [PAD] = 0
    types = ((torch.arange(seq_len)[None, :] >= (lengths // 2)[:, None]) & mask.bool()).long()
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    labels[pick] = torch.randint(0, VOCAB, (int(pick.sum()),), generator=g)
    nsp = torch.randint(0, 2, (batch_size,), generator=g)
    return ids, mask, types, labels, nsp


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max abs diff {diff} > {tol}"


SWITCHES = [
    dict(unpad=True, use_sdpa=True, unpad_attention="per_sequence"),
    dict(unpad=True, use_sdpa=True, unpad_attention="padded"),
    dict(unpad=False, use_sdpa=True),
    dict(unpad=True, use_sdpa=False),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_bert_model_matches_transformers(switches):
    torch.manual_seed(0)
    ours = BertModel(tiny_config(**switches)).eval()
    theirs = hf_twin(ours, transformers.BertModel, attn="sdpa" if switches["use_sdpa"] else "eager")
    ids, mask, types, _, _ = batch()
    a = ours(ids, attention_mask=mask, token_type_ids=types)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert_close(a.last_hidden_state[real], b.last_hidden_state[real])  # padding rows are don't-care
    assert_close(a.pooler_output, b.pooler_output)
    if switches["unpad"]:
        assert a.last_hidden_state[~real].abs().max() == 0
    else:
        assert_close(a.last_hidden_state, b.last_hidden_state)


@pytest.mark.parametrize("layout", ["per_sequence", "padded"])
def test_left_padding_matches_transformers(layout):
    torch.manual_seed(14)
    ours = BertModel(tiny_config(unpad_attention=layout)).eval()
    theirs = hf_twin(ours, transformers.BertModel)
    ids, mask, types, _, _ = batch()
    ids, mask, types = ids.flip(1), mask.flip(1), types.flip(1)  # real tokens at the end of each row
    a = ours(ids, attention_mask=mask, token_type_ids=types)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert_close(a.last_hidden_state[real], b.last_hidden_state[real])
    assert_close(a.pooler_output[0], b.pooler_output[0])  # row 0 is full; others pool a [PAD] position


def test_bert_model_without_mask_or_segments_matches_transformers():
    torch.manual_seed(1)
    ours = BertModel(tiny_config()).eval()
    theirs = hf_twin(ours, transformers.BertModel)
    ids = batch()[0].clamp(min=1)
    assert_close(ours(ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("unpad", [True, False])
def test_pretraining_loss_and_grads_match_transformers(unpad):
    torch.manual_seed(2)
    ours = BertForPreTraining(tiny_config(unpad=unpad)).eval()
    theirs = hf_twin(ours, transformers.BertForPreTraining)
    ids, mask, types, labels, nsp = batch(seed=3)
    a = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    b = theirs(
        input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp
    )
    assert_close(a.loss, b.loss)
    flat_pred = labels.view(-1) != -100
    assert a.mlm_logits.shape == (int(flat_pred.sum()), VOCAB)  # projection only at predicted positions
    assert_close(a.mlm_logits, b.prediction_logits.reshape(-1, VOCAB)[flat_pred])
    assert_close(a.nsp_logits, b.seq_relationship_logits)
    ce = torch.nn.functional.cross_entropy
    assert_close(a.mlm_loss, ce(b.prediction_logits.reshape(-1, VOCAB), labels.view(-1)))
    assert_close(a.nsp_loss, ce(b.seq_relationship_logits, nsp))
    assert torch.equal(a.mlm_labels, labels.view(-1)[flat_pred])

    a.loss.backward()
    b.loss.backward()
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in (
        "bert.embeddings.word_embeddings.weight",  # gets gradient from the input and the tied decoder
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.dense.weight",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.bias",
        "cls.seq_relationship.weight",
        "bert.pooler.dense.bias",
    ):
        assert_close(ours_params[name].grad, their_params[name].grad)


def test_pretraining_without_labels_projects_every_position():
    torch.manual_seed(4)
    ours = BertForPreTraining(tiny_config()).eval()
    theirs = hf_twin(ours, transformers.BertForPreTraining)
    ids, mask, types, _, _ = batch()
    a = ours(ids, mask, types)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert a.loss is None and a.mlm_loss is None
    real = mask.bool()
    assert_close(a.mlm_logits[real], b.prediction_logits[real])


def test_pretraining_with_nothing_to_predict_gives_zero_mlm_loss():
    model = BertForPreTraining(tiny_config()).eval()
    ids, mask, types, labels, nsp = batch()
    out = model(ids, mask, types, labels=torch.full_like(labels, -100), next_sentence_label=nsp)
    assert out.mlm_loss.item() == 0.0 and torch.isfinite(out.loss)
    assert out.mlm_logits.shape == (0, VOCAB)


@pytest.mark.parametrize("num_labels", [1, 3], ids=["regression", "classification"])
def test_sequence_classification_matches_transformers(num_labels):
    torch.manual_seed(5)
    ours = BertForSequenceClassification(tiny_config(num_labels=num_labels)).eval()
    theirs = hf_twin(ours, transformers.BertForSequenceClassification)
    ids, mask, types, _, _ = batch()
    labels = torch.tensor([0.5, -1.0, 2.0, 0.1]) if num_labels == 1 else torch.tensor([0, 2, 1, 2])
    a = ours(ids, mask, types, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert_close(a.logits, b.logits)
    assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    assert_close(ours.classifier.weight.grad, theirs.classifier.weight.grad)
    assert_close(
        ours.bert.encoder.layer[0].intermediate.dense.weight.grad,
        theirs.bert.encoder.layer[0].intermediate.dense.weight.grad,
    )


def test_token_classification_matches_transformers():
    torch.manual_seed(6)
    ours = BertForTokenClassification(tiny_config(num_labels=5)).eval()
    theirs = hf_twin(ours, transformers.BertForTokenClassification)
    ids, mask, types, _, _ = batch()
    labels = torch.randint(0, 5, ids.shape).masked_fill(~mask.bool(), -100)
    a = ours(ids, mask, types, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert_close(a.logits[mask.bool()], b.logits[mask.bool()])
    assert_close(a.loss, b.loss)
    assert "bert.pooler.dense.weight" not in ours.state_dict()  # no pooler, as transformers


def test_question_answering_matches_transformers():
    torch.manual_seed(7)
    ours = BertForQuestionAnswering(tiny_config(unpad=False)).eval()
    theirs = hf_twin(ours, transformers.BertForQuestionAnswering)
    ids, mask, types, _, _ = batch()
    start, end = torch.tensor([3, 5, 1, 40]), torch.tensor([4, 8, 2, 41])  # the last one is out of range
    a = ours(ids, mask, types, start_positions=start, end_positions=end)
    b = theirs(
        input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=start, end_positions=end
    )
    assert_close(a.start_logits, b.start_logits)
    assert_close(a.end_logits, b.end_logits)
    assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    assert_close(ours.qa_outputs.weight.grad, theirs.qa_outputs.weight.grad)


def test_unpadded_and_padded_paths_agree_in_training_with_dropout():
    """Packing changes the layout dropout masks are drawn in, so compare in train() with dropout off."""
    ids, mask, types, labels, nsp = batch(seed=8)
    losses, grads = [], []
    for unpad in (True, False):
        torch.manual_seed(9)
        cfg = tiny_config(unpad=unpad, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = randomise(BertForPreTraining(cfg))
        out = model.train()(ids, mask, types, labels, nsp)
        out.loss.backward()
        losses.append(out.loss)
        grads.append(model.bert.encoder.layer[1].attention.self.value.weight.grad)
    assert_close(losses[0], losses[1])
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize("layout", ["padded", "per_sequence"])
def test_packing_precomputed_on_the_host_gives_the_same_numbers(layout):
    from bert.model.encoder import packing_inputs
    from bert.model.heads import find_mlm_positions

    ids, mask, types, labels, nsp = batch(seed=15)
    host = packing_inputs(mask.numpy())  # a collator may hold numpy arrays
    assert torch.equal(host["unpad_indices"], mask.view(-1).nonzero().squeeze(1))
    assert host["cu_seqlens"].tolist() == [0, 24, 41, 50, 63] and host["cu_seqlens"].dtype == torch.int32
    assert host["max_seqlen"] == 24
    torch.manual_seed(16)
    model = randomise(BertForPreTraining(tiny_config(unpad_attention=layout))).eval()
    a = model(ids, mask, types, labels, nsp)
    b = model(ids, mask, types, labels, nsp, mlm_positions=find_mlm_positions(labels), **host)
    assert torch.equal(a.mlm_positions, b.mlm_positions)
    assert_close(a.loss, b.loss, tol=0)
    assert_close(a.mlm_logits, b.mlm_logits, tol=0)


def reference_varlen(q, k, v, cu_seqlens, max_seqlen):
    """What flash varlen attention computes, sequence by sequence on the CPU (the kernel is CUDA-only)."""
    assert q.shape == k.shape == v.shape and q.dim() == 3 and cu_seqlens.dtype == torch.int32
    assert max_seqlen >= int(cu_seqlens.diff().max())  # flash attention takes any upper bound
    bounds = cu_seqlens.tolist()
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            *(t[i:j].transpose(0, 1) for t in (q, k, v))
        ).transpose(0, 1)
        for i, j in zip(bounds, bounds[1:], strict=False)
    ]
    return torch.cat(outs)


@pytest.mark.parametrize("precomputed", ["host", "host-without-max", "model"])
def test_varlen_attention_equals_the_padded_reference(monkeypatch, precomputed):
    """The packing from the collator, from the compiled engine (no max_seqlen: the padded length bounds
    it), or from the model itself."""
    from bert.model import encoder
    from bert.model.encoder import packing_inputs

    ids, mask, types, labels, nsp = batch(seed=17)
    for t in (ids, mask, types):
        t[0, 20:] = 0  # no row fills the padded length: the bound differs from the longest sequence
    labels[0, 20:] = -100
    results = []
    for layout in ("padded", "varlen"):
        torch.manual_seed(18)
        model = randomise(
            BertForPreTraining(tiny_config(unpad_attention=layout, attention_probs_dropout_prob=0.0))
        )
        calls: list[int] = []
        monkeypatch.setattr(
            encoder, "varlen_attention", lambda *a, c=calls: c.append(a[-1]) or reference_varlen(*a)
        )
        host = packing_inputs(mask) if precomputed != "model" else {}
        if precomputed == "host-without-max":
            del host["max_seqlen"]
        out = model.eval()(ids, mask, types, labels, nsp, **host)
        out.loss.backward()
        assert len(calls) == (2 if layout == "varlen" else 0)  # every layer attends packed
        longest = int(mask.sum(1).max())
        assert set(calls) <= {ids.shape[1] if precomputed == "host-without-max" else longest}
        results.append((out, model.bert.encoder.layer[0].attention.self.query.weight.grad))
    (padded, padded_grad), (varlen, varlen_grad) = results
    assert_close(padded.loss, varlen.loss)
    assert_close(padded.mlm_logits, varlen.mlm_logits)
    assert_close(padded_grad, varlen_grad)


def test_varlen_attention_has_no_dropout_and_needs_cuda():
    with pytest.raises(
        ValueError, match="has no attention dropout.*attention_probs_dropout_prob.*MosaicBERT"
    ):
        tiny_config(unpad_attention="varlen")  # the default 0.1 is never dropped silently
    model = BertModel(tiny_config(unpad_attention="varlen", attention_probs_dropout_prob=0.0)).eval()
    ids, mask, _, _, _ = batch()
    with pytest.raises(ValueError, match="needs CUDA tensors in bf16 or fp16.*'padded' on the CPU"):
        model(ids, mask)
    assert_close(
        model(ids).last_hidden_state, model(ids, torch.ones_like(ids)).last_hidden_state
    )  # no padding


def test_padded_vocabulary_changes_no_number():
    ids, mask, types, labels, nsp = batch(seed=19)
    torch.manual_seed(20)
    plain = randomise(
        BertForPreTraining(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    )
    padded = BertForPreTraining(tiny_config(pad_vocab_to_multiple_of=64, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0))  # fmt: skip
    emb, bias = padded.bert.embeddings.word_embeddings.weight, padded.cls.predictions.bias
    assert emb.shape == (128, 32) and bias.shape == (128,) and padded.config.padded_vocab_size == 128
    assert emb[VOCAB:].abs().max() == 0 and bias[VOCAB:].abs().max() == 0  # init leaves the padding zero
    with torch.no_grad():
        for name, p in padded.named_parameters():
            p[: plain.state_dict()[name].shape[0]].copy_(plain.state_dict()[name])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (plain, padded)]
    for _ in range(2):
        outs = []
        for model, optimizer in zip((plain, padded), optimizers, strict=True):
            out = model.train()(ids, mask, types, labels, nsp)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            outs.append(out)
        assert outs[1].mlm_logits.shape == outs[0].mlm_logits.shape == (int((labels != -100).sum()), VOCAB)
        assert_close(outs[0].loss, outs[1].loss)
    assert emb[VOCAB:].abs().max() == 0 and bias[VOCAB:].abs().max() == 0  # never predicted, never trained
    assert_close(emb[:VOCAB], plain.bert.embeddings.word_embeddings.weight)
    without_labels = padded.eval()(ids, mask)  # every position: the logits are cut to the vocabulary too
    assert without_labels.mlm_logits.shape == (*ids.shape, VOCAB)


def test_gradient_checkpointing_gives_identical_gradients():
    ids, mask, types, labels, nsp = batch(seed=10)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(11)
        model = BertForPreTraining(tiny_config(gradient_checkpointing=ckpt)).train()
        torch.manual_seed(12)  # same dropout masks: checkpointing replays the RNG state
        model(ids, mask, types, labels, nsp).loss.backward()
        grads.append(model.bert.encoder.layer[0].attention.self.query.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_initialisation_is_berts():
    torch.manual_seed(13)
    cfg = tiny_config(vocab_size=1000, hidden_size=64, initializer_range=0.05)
    model = BertForPreTraining(cfg)
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb  # tied
    assert emb[cfg.pad_token_id].abs().max() == 0
    assert abs(emb[1:].std().item() - 0.05) < 0.005
    layer = model.bert.encoder.layer[0]
    assert abs(layer.intermediate.dense.weight.std().item() - 0.05) < 0.005
    assert layer.intermediate.dense.bias.abs().max() == 0
    assert torch.equal(layer.output.LayerNorm.weight, torch.ones(64))
    assert layer.output.LayerNorm.bias.abs().max() == 0
    assert model.cls.predictions.bias.abs().max() == 0


def test_presets():
    assert BertConfig.preset("tiny").num_hidden_layers == 2
    mini = BertConfig.preset("mini")
    assert (mini.num_hidden_layers, mini.hidden_size, mini.num_attention_heads, mini.intermediate_size) == (
        4,
        256,
        4,
        1024,
    )
    small = BertConfig.preset("small", vocab_size=1000)
    assert (small.hidden_size, small.num_attention_heads, small.vocab_size) == (512, 8, 1000)
    assert BertConfig.preset("base").hidden_size == 768 and BertConfig.preset("large").num_hidden_layers == 24
    assert BertConfig().vocab_size == 30522 and BertConfig().max_position_embeddings == 512
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        BertConfig.preset("huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "multiple of num_attention_heads"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(hidden_act="swishy"), "hidden_act 'swishy' is not supported"),
        (dict(hidden_dropout_prob=1.5), r"hidden_dropout_prob must be in \[0, 1\)"),
        (dict(pad_token_id=500), "pad_token_id"),
        (dict(num_labels=3, id2label={0: "a", 1: "b"}), "id2label has keys"),
        (dict(problem_type="ranking"), "problem_type 'ranking'"),
        (dict(unpad_attention="flash"), "unpad_attention must be one of"),
        (dict(pad_vocab_to_multiple_of=0), "pad_vocab_to_multiple_of must be a positive integer"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_inputs_raise_clear_errors():
    model = BertModel(tiny_config()).eval()
    ids = torch.randint(1, VOCAB, (2, 10))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=97\).*max 97"):
        model(ids.index_fill(1, torch.tensor([3]), VOCAB))
    with pytest.raises(ValueError, match="min -1"):
        model(ids.index_fill(1, torch.tensor([3]), -1))
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        model(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])
    with pytest.raises(ValueError, match="num_labels=2"):
        BertForQuestionAnswering(tiny_config(num_labels=3))
