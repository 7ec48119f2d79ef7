"""The run report: figures from real stage directories, the training curves PNG, the Markdown page."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from bert.finetune.loop import Evaluation, SeedRun
from bert.finetune.stage import summarise
from bert.finetune.tasks import get_task
from data_prep.examples_stage import ExamplesConfig, generate_examples
from data_prep.manifest import read_manifest
from data_prep.shard import ShardConfig, shard_corpus
from data_prep.vocab import VocabConfig, train_vocab
from flows.report import (
    collect_figures,
    degenerate_note,
    evaluation_rows,
    render_markdown,
    training_curves_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_STEPS = 120


@pytest.fixture(scope="module")
def data_dirs(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """Real shard, vocab and examples directories from seven inaugural addresses, one of them twice."""
    root = tmp_path_factory.mktemp("run")
    inaugural = shared_data / "corpus" / "inaugural"
    # 2005-Bush.txt is the one speech that is not valid UTF-8: the decode fallback shows in the figures.
    speeches = [*sorted(inaugural.glob("17*.txt"))[:5], inaugural / "2005-Bush.txt"]
    copy = root / "input" / "copy-of-the-first.txt"
    copy.parent.mkdir()
    copy.write_bytes(speeches[0].read_bytes())
    shard_corpus(
        ShardConfig(
            inputs=[*(str(p) for p in speeches), str(copy)],
            out=str(root / "corpus"),
            num_shards=1,
            doc_boundary="file",
            valid_fraction=0.25,
        )
    )
    train_vocab(VocabConfig(corpus=str(root / "corpus"), out=str(root / "vocab"), vocab_size=400))
    generate_examples(
        ExamplesConfig(corpus=root / "corpus", vocab=root / "vocab", out=root / "examples", max_seq_length=64)
    )
    return {name: root / name for name in ("corpus", "vocab", "examples")}


def write_pretrain(directory: Path, last_step: int = NUM_STEPS) -> Path:
    """metrics.jsonl, result.json and hf/config.json with the keys bert/pretrain.py's fit writes."""
    records = []
    for step in range(1, NUM_STEPS + 1):
        mlm_loss, nsp_loss = 2.0 + 6.0 * math.exp(-step / 40), 0.69 - 0.1 * step / NUM_STEPS
        metrics = {
            "loss": mlm_loss + nsp_loss,
            "mlm_loss": mlm_loss,
            "nsp_loss": nsp_loss,
            "mlm_acc": 0.3 * step / NUM_STEPS,
            "nsp_acc": 0.5 + 0.1 * step / NUM_STEPS,
            "tokens": 3800,
            "samples": 64,
            "grad_norm": 1.5,
            "lr": 1e-3,
        }
        records.append(
            {
                "step": step,
                "epoch": 0,
                **metrics,
                "step_time_s": 0.2,
                "tokens_per_s": 19000.0 + step,
                "tokens_per_s_per_rank": 9500.0,
                "samples_per_s": 320.0,
            }
        )
        if step % 40 == 0:
            records.append(
                {
                    "step": step,
                    "eval_loss": 9.0 - step / 40,
                    "eval_mlm_loss": 8.4 - step / 40,
                    "eval_nsp_loss": 0.6,
                    "eval_mlm_acc": 0.2,
                    "eval_nsp_acc": 0.55,
                    "eval_tokens": 7600,
                    "eval_samples": 128,
                }
            )
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "hf").mkdir()
    (directory / "hf" / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64}))
    final = {k: v for k, v in records[-2].items() if k != "epoch"} | {"step": last_step, "loss": 2.5}
    result = {
        "out": str(directory),
        "step": last_step,
        "stop_reason": "max_steps",
        "metrics": final,
        "eval_metrics": {
            "step": last_step,
            "loss": 5.5,
            "mlm_loss": 4.9,
            "nsp_loss": 0.6,
            "mlm_acc": 0.25,
            "nsp_acc": 0.55,
            "tokens": 7600,
            "samples": 128,
        },
        "checkpoint": str(directory / "checkpoints"),
        "hf_dir": str(directory / "hf"),
    }
    (directory / "result.json").write_text(json.dumps(result))
    return directory


def write_finetune(
    directory: Path,
    task_name: str,
    seed_scores: dict[int, dict | None],
    degenerate_seeds: tuple[int, ...] = (),
) -> Path:
    """metrics.json through bert.finetune.summarise; a None score marks a single-class (degenerate) seed whose
    measured scores are not known (as in summaries written before `measured`), a seed in ``degenerate_seeds``
    one that measured the scores given."""
    task = get_task(task_name)
    runs = []
    for seed, scores in seed_scores.items():
        single_class = scores is None or seed in degenerate_seeds
        degenerate = "predicted the class '1' for all 1043 examples" if single_class else None
        scores = scores or dict.fromkeys(task.metrics, 0.0)
        runs.append(
            SeedRun(
                seed=seed,
                evaluation=Evaluation(scores, [], degenerate),
                best_epoch=0,
                history=[],
                train_seconds=1.0,
                model_dir=None,
            )
        )
    summary = summarise(task, runs)
    for result in summary["results"]:
        if seed_scores[result["seed"]] is None:
            result.pop("measured")
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture
def run_dirs(data_dirs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A whole run: real data stages, a fabricated pretrain, CoLA all degenerate and SST-2 with one."""
    return {
        **data_dirs,
        "pretrain": write_pretrain(tmp_path / "pretrain"),
        "finetune-cola": write_finetune(tmp_path / "finetune-cola", "cola", {0: None, 1: None}),
        "finetune-sst2": write_finetune(
            tmp_path / "finetune-sst2",
            "sst2",
            {0: {"accuracy": 0.80}, 1: None, 2: {"accuracy": 0.84}},
        ),
    }


def test_figures_come_from_the_stage_manifests(run_dirs):
    figures = collect_figures(run_dirs)
    corpus = read_manifest(run_dirs["corpus"])["stats"]
    vocab = read_manifest(run_dirs["vocab"])["stats"]
    examples = read_manifest(run_dirs["examples"])["stats"]
    assert figures["corpus.documents"] == corpus["documents"] > 0
    assert figures["corpus.duplicates_dropped"] == corpus["dropped"]["duplicate"] == 1
    assert figures["corpus.decode_fallback_lines"] == corpus["decode_fallback_lines"] > 0
    assert figures["corpus.train_documents"] + figures["corpus.valid_documents"] == corpus["documents"]
    assert figures["vocab.size"] == vocab["vocab_size"] <= 400
    assert figures["vocab.unk_rate"] == vocab["unk_rate"]
    assert figures["vocab.tokens_per_word"] == pytest.approx(vocab["tokens_per_word"])
    assert vocab["tokens_per_word"] > 1
    assert figures["examples.count"] == examples["examples"] > 0
    assert figures["examples.nsp_random_share"] == examples["nsp_random_next_share"]
    shares = [figures[f"examples.masked_share_{k}"] for k in ("mask", "random", "keep")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3) and shares[0] > 0.7
    assert figures["examples.truncated_share"] == examples["truncated_share"]
    assert "examples.example" not in figures  # the decoded example goes into the Markdown, not the figures
    json.dumps(figures)  # a Prefect artifact and the next run's "previous": plain JSON


def test_pretrain_figures_prefer_result_json_over_the_last_logged_step(run_dirs, tmp_path):
    figures = collect_figures(run_dirs)
    assert figures["pretrain.steps"] == NUM_STEPS
    assert figures["pretrain.final_loss"] == 2.5  # result.json's final record, not the jsonl's last
    assert figures["pretrain.eval_loss"] == 5.5 and figures["pretrain.eval_mlm_acc"] == 0.25
    assert figures["pretrain.num_layers"] == 2 and figures["pretrain.stop_reason"] == "max_steps"
    assert figures["pretrain.median_tokens_per_s"] == pytest.approx(19000 + (NUM_STEPS + 1) / 2)
    (run_dirs["pretrain"] / "result.json").unlink()  # an interrupted run: metrics.jsonl alone
    figures = collect_figures({"pretrain": run_dirs["pretrain"]})
    assert figures["pretrain.steps"] == NUM_STEPS
    assert figures["pretrain.final_mlm_acc"] == pytest.approx(0.3)
    assert figures["pretrain.eval_step"] == NUM_STEPS and figures["pretrain.eval_loss"] == pytest.approx(6.0)


def test_finetune_figures_and_rows_leave_degenerate_seeds_unscored(run_dirs):
    figures = collect_figures(run_dirs)
    assert figures["finetune.cola.metric"] == "mcc"
    assert figures["finetune.cola.seeds"] == figures["finetune.cola.degenerate_seeds"] == 2
    assert "finetune.cola.mcc.median" not in figures  # no seed scored: no median, not a median of 0
    assert figures["finetune.sst2.accuracy.median"] == pytest.approx(0.82)
    assert figures["finetune.sst2.degenerate_seeds"] == 1
    rows = evaluation_rows(run_dirs)
    by_key = {(r["task"], r["seed"]): r for r in rows}
    assert len(rows) == 2 + 1 + 3 + 1
    assert by_key["cola", 0] == {
        "task": "cola",
        "metric": "mcc",
        "seed": 0,
        "value": None,
        "degenerate": True,
    }
    assert by_key["cola", "median"]["value"] is None and by_key["cola", "median"]["degenerate"]
    assert by_key["sst2", 1]["value"] is None and by_key["sst2", 1]["degenerate"]
    assert by_key["sst2", 2] == {
        "task": "sst2",
        "metric": "accuracy",
        "seed": 2,
        "value": 0.84,
        "degenerate": False,
    }
    assert (
        by_key["sst2", "median"]["value"] == pytest.approx(0.82)
        and not by_key["sst2", "median"]["degenerate"]
    )


def test_training_curves_are_a_small_png(run_dirs, tmp_path):
    png = training_curves_png(run_dirs["pretrain"] / "metrics.jsonl")
    assert png is not None and png.startswith(PNG_SIGNATURE)
    assert 2_000 < len(png) <= 60_000
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.size == (720, 208)  # 9 x 2.6 inches at 80 dpi
    assert training_curves_png(tmp_path / "absent.jsonl") is None
    (tmp_path / "empty.jsonl").write_text("")
    assert training_curves_png(tmp_path / "empty.jsonl") is None
    (tmp_path / "cut.jsonl").write_text('{"step": 1, "loss": 9.1, "mlm_lo')  # a run killed mid-write
    assert training_curves_png(tmp_path / "cut.jsonl") is None


def test_markdown_holds_every_section_the_example_and_the_curves(run_dirs):
    figures = collect_figures(run_dirs)
    png = training_curves_png(run_dirs["pretrain"] / "metrics.jsonl")
    notes = ("A note on this run.",)
    text = render_markdown(figures, run_dirs, png=png, notes=notes)
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == ["Corpus", "Tokenizer", "Examples", "Pretraining", "Fine-tuning"]
    example = read_manifest(run_dirs["examples"])["stats"]["example"]
    block = re.search(r"```\n(.*?)\n```", text, flags=re.DOTALL).group(1)
    assert example["tokens"] in block and example["masked_lm"] in block
    assert f"| documents | {figures['corpus.documents']:,} |" in text
    assert f"| NSP: B is a random segment | {100 * figures['examples.nsp_random_share']:.1f}% |" in text
    assert "| final loss | 2.500 |" in text  # 4 significant digits, trailing zeros kept
    embedded = re.search(r"!\[training curves\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert base64.b64decode(embedded.group(1)) == png
    fine_tuning = text.split("## Fine-tuning")[1]
    assert "| cola | mcc | degenerate, not scored | degenerate, not scored |" in fine_tuning
    assert "| sst2 | accuracy | 0.8000 | degenerate, not scored | 0.8400 | 0.8200 |" in fine_tuning
    assert "0.0000" not in fine_tuning  # the degenerate seeds' MCC of 0 is never shown as a score
    assert fine_tuning.rstrip().endswith(notes[0])


def test_previous_run_is_shown_side_by_side(run_dirs):
    figures = collect_figures(run_dirs)
    previous = dict(figures)
    previous["corpus.documents"] = figures["corpus.documents"] - 2
    previous["examples.nsp_random_share"] = figures["examples.nsp_random_share"] - 0.1
    previous["finetune.sst2.accuracy.median"] = 0.7
    text = render_markdown(figures, run_dirs, previous=previous)
    assert "| figure | this run | previous run | change |" in text
    documents = figures["corpus.documents"]
    assert f"| documents | {documents:,} | {documents - 2:,} | +2 (" in text
    assert "| +10.0 pp |" in text
    assert f"| vocabulary size | {figures['vocab.size']:,} | {figures['vocab.size']:,} | same |" in text
    assert "| 0.8200 | 0.7000 | +0.1200 |" in text
    assert "previous run" not in render_markdown(figures, run_dirs)


def test_missing_and_unfinished_stages_do_not_raise(tmp_path):
    unfinished = tmp_path / "examples"
    unfinished.mkdir()
    (unfinished / ".inprogress.json").write_text("{}")
    not_a_dir = tmp_path / "corpus"
    not_a_dir.write_text("x")
    broken = tmp_path / "finetune-cola"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    stage_dirs = {
        "corpus": not_a_dir,
        "vocab": tmp_path / "absent",
        "examples": unfinished,
        "pretrain": tmp_path / "absent-too",
        "finetune-cola": broken,
    }
    assert collect_figures(stage_dirs) == {}
    assert collect_figures({}) == {}
    assert evaluation_rows(stage_dirs) == []
    text = render_markdown({}, stage_dirs, previous={})
    assert text.count("Not run") == 5
    assert degenerate_note({}) is None


def test_degenerate_note_explains_cola_and_points_at_sst2(run_dirs, tmp_path):
    figures = collect_figures(run_dirs)
    note = degenerate_note(figures)
    assert note is not None and "\n" not in note
    assert "CoLA" in note and "2-layer" in note and f"{NUM_STEPS} steps" in note
    assert "majority class" in note and "0 by definition" in note and "instead of scoring" in note
    assert "SST-2" in note and "82.0%" in note
    scored = dict(
        run_dirs,
        **{
            "finetune-cola": write_finetune(
                tmp_path / "cola-ok", "cola", {0: None, 1: {"mcc": 0.1, "accuracy": 0.7}}
            )
        },
    )
    assert degenerate_note(collect_figures(scored)) is None  # one seed scored: nothing to explain
    assert degenerate_note({k: v for k, v in figures.items() if not k.startswith("finetune.cola")}) is None
    # another task beside it: the note names that one and its metric
    ner = {k: v for k, v in figures.items() if not k.startswith("finetune.sst2")}
    ner.update({"finetune.ner.metric": "f1", "finetune.ner.f1.median": 0.3479})
    assert "NER next to it" in degenerate_note(ner) and "entity F1 of 0.348" in degenerate_note(ner)
    alone = {k: v for k, v in figures.items() if not k.startswith("finetune.sst2")}
    assert "(SST-2 sentiment, NER) shows what the model does learn" in degenerate_note(alone)


def test_a_seed_listed_as_degenerate_is_not_scored_even_with_a_score(run_dirs):
    metrics_file = run_dirs["finetune-cola"] / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    for result in metrics["results"]:  # as a writer that kept the 0.0 MCC and only listed the seeds might
        result.pop("degenerate")
        result["mcc"] = 0.0
    metrics_file.write_text(json.dumps(metrics))
    rows = [r for r in evaluation_rows(run_dirs) if r["task"] == "cola"]
    assert [r["value"] for r in rows] == [None, None, None]
    assert all(r["degenerate"] for r in rows)
    assert "| cola | mcc | degenerate, not scored |" in render_markdown(collect_figures(run_dirs), run_dirs)


def test_the_report_puts_the_pretrained_model_beside_each_baseline(run_dirs, tmp_path):
    from flows.report import baseline_rows

    baselines = {
        "random-init": write_finetune(tmp_path / "b-random", "sst2", {0: {"accuracy": 0.70}, 1: {"accuracy": 0.71},
                                                                      2: {"accuracy": 0.69}}),
        "bert-base": write_finetune(tmp_path / "b-base", "sst2", {0: {"accuracy": 0.91}, 1: {"accuracy": 0.92}}),
    }  # fmt: skip
    (tmp_path / "baselines.json").write_text(json.dumps({"sst2": {k: str(v) for k, v in baselines.items()}}))
    dirs = {**run_dirs, "baselines": tmp_path / "baselines.json"}
    rows = {r["baseline"]: r for r in baseline_rows(dirs)}
    # the pretrained side: seeds 0 and 2 scored (0.80, 0.84), seed 1 degenerate: summarised before the value
    # it measured was kept (`measured`), so left out
    assert rows["random-init"]["pretrained_median"] == pytest.approx(0.82)
    assert rows["random-init"]["baseline_median"] == pytest.approx(0.70)
    assert rows["random-init"]["lift"] == pytest.approx(0.12) and rows["random-init"]["verdict"] == "better"
    assert rows["bert-base"]["verdict"] == "worse" and rows["bert-base"]["pretrained_seeds"] == 2
    figures = collect_figures(dirs)
    assert figures["finetune.sst2.accuracy.lift.random-init"] == pytest.approx(0.12)
    markdown = render_markdown(figures, dirs)
    assert "## Pretrained against baselines" in markdown
    # noise: pooled std of (0.80, 0.84) and (0.70, 0.71, 0.69) is sqrt(0.001 / 3); 2·s·sqrt(1/2 + 1/3) = 0.0333
    assert (
        "| sst2 | accuracy | random-init | 0.8200 | 0.7000 | +0.1200 | ±0.0333 | better (2 vs 3 seeds) |"
        in markdown
    )
    # a baseline seed that predicted one class counts at what it measured: a random init that learned nothing
    # is a result, not a gap (else "too few seeds")
    chance = write_finetune(tmp_path / "b-chance", "sst2", {0: {"accuracy": 0.51}, 1: {"accuracy": 0.49},
                                                            2: {"accuracy": 0.55}}, degenerate_seeds=(0, 1))  # fmt: skip
    (tmp_path / "baselines.json").write_text(json.dumps({"sst2": {"random-init": str(chance)}}))
    (row,) = baseline_rows(dirs)
    assert row["baseline_seeds"] == 3 and row["baseline_median"] == pytest.approx(0.51)
    assert row["lift"] == pytest.approx(0.31) and row["verdict"] == "better"
    assert "## Pretrained against baselines" not in render_markdown(collect_figures(run_dirs), run_dirs)
