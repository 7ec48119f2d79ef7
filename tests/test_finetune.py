"""Fine-tuning end to end on a tiny random model: one test per task family, on a few dozen real rows."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from typer.testing import CliRunner

from bert.finetune import FinetuneConfig, main
from bert.finetune.loop import Evaluation, SeedRun, make_optimizer
from bert.finetune.stage import summarise
from bert.finetune.tasks import get_task
from bert.model import BertConfig, BertForSequenceClassification, BertModel

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with a ~300-piece WordPiece vocabulary (vocab.txt only)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rng = random.Random(0)
    corpus = [
        " ".join(
            rng.choice(["the", "a", "of", "to", "in", "and", "denver", "broncos", "won", "game", "clara"])
            for _ in range(12)
        )
    ]
    corpus += [chr(c) * 2 for c in range(ord("a"), ord("z") + 1)]
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS, min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (path / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab))
    (path / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    return path


def run(tiny_model, tmp_path, task, train, eval_, **kwargs):
    defaults = dict(
        seeds=(0, 1), epochs=1, batch_size=8, lr=1e-3, max_seq_length=48, progress=False, num_threads=1
    )
    config = FinetuneConfig(task=task, model=tiny_model, out=tmp_path / "out", train=train, eval=eval_,
                              **{**defaults, **kwargs})  # fmt: skip
    summary = main(config)
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    return summary


def check_summary(summary, task, metric, names, low=-1.0, high=1.0):
    assert set(summary) >= {"task", "metric", "results", "median", "mean", "std", "degenerate_seeds"}
    assert summary["task"] == task and summary["metric"] == metric
    scored = [r for r in summary["results"] if not r.get("degenerate")]
    assert [r["seed"] for r in summary["results"]] == [0, 1]
    for r in scored:
        for name in names:
            assert low <= r[name] <= high, (name, r[name])
    if scored:
        assert set(summary["median"]) == set(names) and all(v >= 0 for v in summary["std"].values())


def subset(src, dst, n, header=False):
    lines = src.read_text(encoding="utf-8").splitlines(True)
    rows = lines[1:] if header else lines
    dst.write_text("".join(lines[:1] if header else []) + "".join(rows[:: max(1, len(rows) // n)][:n]))
    return dst


def test_cola_rows(tiny_model, tmp_path, shared_data):
    train = subset(shared_data / "cola/train.tsv", tmp_path / "train.tsv", 48)
    dev = subset(shared_data / "cola/dev.tsv", tmp_path / "dev.tsv", 24)
    summary = run(tiny_model, tmp_path, "cola", train, dev)
    check_summary(summary, "cola", "mcc", ["mcc", "accuracy"])
    for seed in (0, 1):
        rows = [
            json.loads(x)
            for x in (tmp_path / "out/predictions" / f"seed-{seed}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 24 and {r["prediction"] for r in rows} <= {"0", "1"}
    if summary["degenerate_seeds"] != [0, 1]:  # the best non-degenerate seed is saved, with its tokenizer
        model = BertForSequenceClassification.from_pretrained(tmp_path / "out/model")
        assert model.config.id2label == {0: "0", 1: "1"} and (tmp_path / "out/model/vocab.txt").exists()
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary files left behind


def test_mrpc_pairs(tiny_model, tmp_path, shared_data):
    train = subset(shared_data / "glue/MRPC/train.tsv", tmp_path / "train.tsv", 40, header=True)
    dev = subset(shared_data / "glue/MRPC/dev.tsv", tmp_path / "dev.tsv", 20, header=True)
    summary = run(tiny_model, tmp_path, "mrpc", train, dev, save_model=False)
    check_summary(summary, "mrpc", "f1", ["f1", "accuracy"], low=0.0)
    assert not (tmp_path / "out/model").exists()


def test_stsb_regression(tiny_model, tmp_path, shared_data):
    train = subset(shared_data / "glue/STS-B/train.tsv", tmp_path / "train.tsv", 40, header=True)
    dev = subset(shared_data / "glue/STS-B/dev.tsv", tmp_path / "dev.tsv", 20, header=True)
    summary = run(tiny_model, tmp_path, "stsb", train, dev, epochs=2)
    check_summary(summary, "stsb", "pearson", ["pearson", "spearman"])
    assert json.loads((tmp_path / "out/model/config.json").read_text())["num_labels"] == 1
    rows = (tmp_path / "out/predictions/seed-0.jsonl").read_text().splitlines()
    assert isinstance(json.loads(rows[0])["prediction"], float)


def conll_subset(src, dst, num_sentences):
    blocks = [b for b in src.read_text(encoding="utf-8").split("\n\n") if b.strip() and "-DOCSTART-" not in b]
    dst.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(blocks[:num_sentences]) + "\n")
    return dst


def test_ner_conll(tiny_model, tmp_path, shared_data):
    train = conll_subset(shared_data / "conll2003/train.txt", tmp_path / "train.txt", 40)
    dev = conll_subset(shared_data / "conll2003/valid.txt", tmp_path / "valid.txt", 20)
    summary = run(tiny_model, tmp_path, "ner", train, dev, epochs=2, lr=3e-3)
    check_summary(summary, "ner", "f1", ["f1", "precision", "recall"], low=0.0)
    rows = [json.loads(x) for x in (tmp_path / "out/predictions/seed-0.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["prediction"]) == len(r["words"]) for r in rows)


def squad_json(path, version_2):
    context = "the denver broncos won the game in clara . the a of to in and game won ."
    qas = [
        {
            "id": "q1",
            "question": "who won the game ?",
            "answers": [{"text": "denver broncos", "answer_start": 4}],
        },
        {"id": "q2", "question": "where was the game ?", "answers": [{"text": "clara", "answer_start": 35}]},
    ]
    if version_2:
        qas.append({"id": "q3", "question": "who lost ?", "answers": [], "is_impossible": True})
    paragraphs = [{"context": context, "qas": qas}] * 4
    path.write_text(json.dumps({"version": "x", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_squad(tiny_model, tmp_path, task):
    data = squad_json(tmp_path / "squad.json", task == "squad_v2")
    summary = run(tiny_model, tmp_path, task, data, data, epochs=2, max_seq_length=24, doc_stride=6)
    check_summary(summary, task, "f1", ["f1", "exact_match"], low=0.0, high=100.0)
    predictions = json.loads((tmp_path / "out/predictions/seed-0.json").read_text())
    assert set(predictions) == ({"q1", "q2", "q3"} if task == "squad_v2" else {"q1", "q2"})
    context = "the denver broncos won the game in clara . the a of to in and game won ."
    assert all(p in context for p in predictions.values())


def test_training_learns_a_toy_task(tiny_model, tmp_path):
    """Label 1 iff the sentence holds "broncos": loss falls and the dev set is learnt."""
    rng = random.Random(0)
    words = ["the", "a", "of", "to", "in", "and", "won", "game", "clara", "denver"]
    rows = []
    for i in range(112):
        sentence = [rng.choice(words) for _ in range(6)]
        if i % 2:
            sentence[rng.randrange(6)] = "broncos"
        rows.append(f"{' '.join(sentence)}\t{i % 2}\n")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows[:96]))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[96:]))
    summary = run(tiny_model, tmp_path, "sst2", tmp_path / "train.tsv", tmp_path / "dev.tsv",
                  seeds=(0,), epochs=12, lr=1e-3, warmup_ratio=0.0, save_model=False)  # fmt: skip
    history = summary["results"][0]["epochs"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert summary["median"]["accuracy"] >= 0.9


def test_degenerate_seeds_are_flagged_not_scored(tiny_model, tmp_path):
    """Training only on label 1 makes every seed predict one class: flagged, no median, no model."""
    (tmp_path / "train.tsv").write_text("".join(f"s\t1\t\tthe game {i}\n" for i in range(24)))
    (tmp_path / "dev.tsv").write_text("".join(f"s\t{i % 2}\t\tthe a {i}\n" for i in range(8)))
    summary = run(
        tiny_model, tmp_path, "cola", tmp_path / "train.tsv", tmp_path / "dev.tsv", epochs=2, lr=5e-3
    )
    assert summary["degenerate_seeds"] == [0, 1]
    assert summary["median"] == {} and summary["mean"] == {} and "excluded" in summary["note"]
    for r in summary["results"]:
        assert r["degenerate"] and r["mcc"] is None and "'1'" in r["reason"]
    assert not (tmp_path / "out/model").exists()


def test_summary_excludes_degenerate_from_median():
    task = get_task("cola")

    def seed_run(seed, mcc, degenerate=None):
        return SeedRun(seed, Evaluation({"mcc": mcc, "accuracy": 0.5}, [], degenerate), 1, [], 1.0, None)

    summary = summarise(task, [seed_run(0, 0.2), seed_run(1, 0.0, "one class"), seed_run(2, 0.4)])
    assert summary["degenerate_seeds"] == [1]
    assert summary["median"]["mcc"] == pytest.approx(0.3) and summary["mean"]["mcc"] == pytest.approx(0.3)
    assert summary["std"]["mcc"] == pytest.approx(0.1414213562, rel=1e-6)
    assert summary["results"][1]["mcc"] is None


def test_summary_leads_with_the_task_metric():
    task = get_task("ner")
    scores = {"precision": 0.5, "recall": 0.7, "f1": 0.6}  # the order metrics.entity_scores returns
    summary = summarise(task, [SeedRun(0, Evaluation(scores, [], None), 1, [], 1.0, None)])
    assert list(summary["median"]) == ["f1", "precision", "recall"] and summary["metric"] == "f1"


def test_cli_reports_bad_input_in_one_line(tiny_model, tmp_path):
    from flows.cli import app

    (tmp_path / "train.tsv").write_text("s\t1\t\tok\ns\t0\t\tfine\ns\tmaybe\t\tbad\n")
    result = CliRunner().invoke(
        app, ["finetune", "--task", "cola", "--model", str(tiny_model), "--train", str(tmp_path / "train.tsv"),
              "--eval", str(tmp_path / "train.tsv"), "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2
    output = result.output.strip()
    assert "Traceback" not in output and len(output.splitlines()) == 1
    assert "train.tsv:3: label 'maybe'" in output


@pytest.mark.parametrize("total, warmup", [(100, 10), (37, 3), (20, 0)])
def test_schedule_is_pretrainings_and_decays_as_transformers(total, warmup):
    """Fine-tuning's lr per step is bert.optim.lr_multiplier's, as in pretraining: warmup (step + 1) / warmup,
    so the first update is not at lr 0 as in get_linear_schedule_with_warmup (step / warmup); from the end of
    warmup on, the same lr as transformers step for step. AdamW groups as a plain transformers recipe."""
    import torch
    import transformers

    from bert.optim import lr_multiplier

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer, scheduler = make_optimizer(model, 1e-3, 0.01, total, warmup)
    reference_opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3)
    reference = transformers.get_linear_schedule_with_warmup(reference_opt, warmup, total)
    ours, theirs = [], []
    for _ in range(total):
        ours.append(optimizer.param_groups[0]["lr"])
        theirs.append(reference_opt.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        reference_opt.step()
        reference.step()
    assert ours == pytest.approx([1e-3 * lr_multiplier(s, warmup, total) for s in range(total)], abs=1e-12)
    assert ours[:warmup] == pytest.approx([1e-3 * (s + 1) / warmup for s in range(warmup)], abs=1e-12)
    assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)
    assert all(lr > 0 for lr in ours) and (warmup == 0 or theirs[0] == 0.0)
    decay, no_decay = optimizer.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
