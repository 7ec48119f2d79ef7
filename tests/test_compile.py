"""torch.compile in pretraining: the model's forward is one graph, and the compiled engine trains as eager does.

CPU only, on the tiniest model. Inductor takes minutes to compile even that model on two CPU cores, so the
engine test compiles with ``aot_eager`` (Dynamo's graph and AOT autograd, without code generation): it checks
what bertpipe decides (one graph, DeepSpeed keeping the optimizer and the parameter names), not Inductor.
"""

from __future__ import annotations

import pytest
import torch

from bert.model import BertConfig, BertForPreTraining
from bert.model.encoder import packing_inputs
from bert.model.heads import find_mlm_positions

TINIEST = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               pad_vocab_to_multiple_of=64)  # fmt: skip


def batch(seed: int) -> dict[str, torch.Tensor]:
    """A padded MLM + NSP batch of 4 sequences (lengths 12, 7, 12, 4) as the collator gives it (CPU)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = mask[3, 4:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, [1, 3]] = ids[:, [1, 3]]  # the same positions in every batch: one graph for every step
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels, "next_sentence_label": torch.tensor([0, 1, 0, 1])}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("multiple_of", [0, 32])  # 32: fill rows (TrainConfig.pack_multiple_of)
def test_the_training_forward_has_no_graph_breaks(multiple_of):
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**TINIEST)).train()
    inputs = batch(0)
    # what Engine adds on the host before moving the batch to the device
    inputs.update(
        packing_inputs(inputs["attention_mask"], multiple_of),
        mlm_positions=find_mlm_positions(inputs["labels"], multiple_of),
    )
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_engine_trains_as_eager_and_keeps_names(monkeypatch):
    from bert.pretrain import engine as eng

    eng.init_distributed()
    monkeypatch.setattr(eng.Engine, "compile_backend", "aot_eager")
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}}  # fmt: skip

    def train(compile: bool) -> tuple[list[float], eng.Engine]:
        torch.manual_seed(0)
        model = BertForPreTraining(BertConfig(**TINIEST))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = eng.Engine(model, optimizer, dict(ds_config), lambda step: 1e-2, seed=0, compile=compile)
        return [
            engine.step([batch(1)]).fetch()["loss"]
        ], engine  # one step: eager's costs 1 s, compiling 10 s

    torch._dynamo.reset()
    eager_losses, eager = train(compile=False)
    compiled_losses, compiled = train(compile=True)
    assert compiled.compiled and compiled.engine.is_compiled and not eager.engine.is_compiled
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    eager_state, compiled_state = eager.module.state_dict(), compiled.module.state_dict()
    torch.manual_seed(0)
    initial = BertForPreTraining(BertConfig(**TINIEST)).state_dict()
    assert not torch.equal(eager_state["cls.predictions.bias"], initial["cls.predictions.bias"])  # it trained
    assert list(compiled_state) == list(
        eager_state
    )  # no _orig_mod. prefix: checkpoints and exports unchanged
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled.engine.optimizer is not None  # DeepSpeed still owns the optimizer step


def test_compile_defaults_to_cuda_only():
    from bert.pretrain.config import TrainConfig
    from bert.pretrain.engine import resolve_compile

    assert resolve_compile(None) is torch.cuda.is_available()
    assert resolve_compile(True) and not resolve_compile(False)
    assert TrainConfig(examples="e", out="o", max_steps=1).compile is None
    with pytest.raises(ValueError, match="compile must be true, false or null"):
        TrainConfig(examples="e", out="o", max_steps=1, compile="yes")


def varied_batch(seed: int, length: int, lengths: list[int], predicted: list[int]) -> dict[str, torch.Tensor]:
    """A batch whose padded length, packed tokens and predicted positions differ from ``batch``'s."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (len(lengths), length), generator=generator)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = torch.full_like(ids, -100)
    labels[:, predicted] = ids[:, predicted]
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels * mask - 100 * (1 - mask), "next_sentence_label": torch.tensor([0, 1, 0, 1])}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("multiple_of", [0, 8])
def test_compiled_engine_compiles_once_for_batches_of_other_sizes(monkeypatch, multiple_of):
    """Packed tokens, predicted positions and padded length vary per batch, and packed to a multiple the
    number of fill sequences with the padded length (``fill_sequences``): one graph serves them all."""
    from torch._dynamo.testing import CompileCounter

    from bert.model.encoder import fill_sequences
    from bert.pretrain import engine as eng

    eng.init_distributed()
    counter = CompileCounter()
    monkeypatch.setattr(eng.Engine, "compile_backend", counter)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**TINIEST))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}}  # fmt: skip
    engine = eng.Engine(model, optimizer, ds_config, lambda step: 1e-2, seed=0, compile=True,
                        pack_multiple_of=multiple_of)  # fmt: skip
    batches = [varied_batch(1, 12, [12, 7, 12, 4], [1, 3]), varied_batch(2, 16, [16, 9, 5, 14], [0, 2, 4]),
               varied_batch(3, 3, [3, 3, 2, 3], [1])]  # fmt: skip
    assert fill_sequences(8, 12) != fill_sequences(8, 3)
    losses = [engine.step([b]).fetch()["loss"] for b in batches]
    assert all(loss == loss for loss in losses)  # finite, not NaN
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for {len(batches)} batch shapes"


@pytest.mark.slow
def test_compile_options_reach_the_compiler_and_nothing_else_does(monkeypatch):
    """TrainConfig.compile_options are torch.compile's ``options`` (Inductor's settings), given to the backend."""
    from bert.pretrain import engine as eng

    eng.init_distributed()
    seen: list[dict] = []

    def recording_backend(gm, example_inputs, **kwargs):
        seen.append(kwargs)
        return gm.forward

    monkeypatch.setattr(eng.Engine, "compile_backend", staticmethod(recording_backend))
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}}  # fmt: skip
    for options in ({"fallback_random": True, "coordinate_descent_tuning": True}, {}):
        torch._dynamo.reset()
        seen.clear()
        model = BertForPreTraining(BertConfig(**TINIEST))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine = eng.Engine(model, optimizer, dict(ds_config), lambda step: 1e-2, seed=0, compile=True,
                            compile_options=options)  # fmt: skip
        engine.step([batch(1)]).fetch()
        assert seen and all(kwargs == ({"options": options} if options else {}) for kwargs in seen), seen


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fallback_randm": True}, "'fallback_randm' is not an Inductor setting of this torch (did you mean fallback_random"),
        ({"coordinate_descent_tuning": "yes"}, "coordinate_descent_tuning takes a bool"),
        (["fallback_random"], "compile_options must be an object of Inductor settings"),
    ],
)  # fmt: skip
def test_bad_compile_options_are_refused_with_the_config(tmp_path, options, message):
    from bert.pretrain.config import TrainConfig

    with pytest.raises(ValueError, match="invalid training config") as error:
        TrainConfig(examples=str(tmp_path), out=str(tmp_path / "run"), max_steps=1, compile_options=options)
    assert message in str(error.value)
    with pytest.raises(ValueError, match="compile false turns off"):
        TrainConfig(examples=str(tmp_path), out=str(tmp_path / "run"), max_steps=1, compile=False,
                    compile_options={"fallback_random": True})  # fmt: skip
    assert (
        TrainConfig(examples="e", out="o", max_steps=1, compile_options={"fallback_random": True}).compile
        is None
    )
