"""benchmarks/gpu.py's plumbing that runs without a GPU: the time budget, the figures read from a run's
metrics.jsonl, the peak-memory hook, the document grouping of the synthetic corpus, the e2e summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu  # noqa: E402
import gpu_e2e  # noqa: E402


class Clock:
    """A settable monotonic clock."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_scales_measured_parts_and_skips_what_does_not_fit():
    clock = Clock()
    shapes = {"base-128": gpu_e2e.Shape(12, 100.0, 10.0), "large-128": gpu_e2e.Shape(24, 400.0, 30.0)}
    budget = gpu_e2e.Budget(480, shapes, clock=clock)
    prior = gpu_e2e.PRIOR_COST["transformers"]
    assert budget.estimate("base-128/transformers") == pytest.approx(gpu_e2e.SAFETY * gpu_e2e.sum_cost(prior))
    # 100 s: 32 s start-up and wind-down, two warmup steps 58 s over the median (compilation), 10 steps of 1 s
    budget.record(
        "base-128/ours", 100.0, {"step_times_s": [40.0, 20.0] + [1.0] * 8, "warmup_steps_excluded": 2}
    )
    assert budget.costs["base-128/ours"] == gpu_e2e.RunCost(
        fixed_s=32.0, compile_s=58.0, step_s=1.0, steps=10
    )
    # large: start-up x sqrt(4 x the weights), compilation x 2 the layers, steps x 3 the FLOPs
    assert budget.estimate("large-128/ours") == pytest.approx(gpu_e2e.SAFETY * (32 * 2 + 58 * 2 + 10 * 3))
    assert budget.estimate("base-128/eager") == pytest.approx(gpu_e2e.SAFETY * 100)  # ours' cost bounds it
    assert budget.estimate("base-128/profile") == budget.estimate("base-128/eager")  # ours again, profiled
    for side in gpu_e2e.VARIANTS:  # ours with other settings
        assert budget.estimate(f"base-128/{side}") == budget.estimate("base-128/eager")
    clock.now = 300.0
    reason = budget.skip_reason("large-128/ours")
    assert reason is not None and "180 s left of 480" in reason
    assert budget.skip_reason("base-128/transformers") is None
    assert budget.estimate("device") == pytest.approx(gpu_e2e.PRIOR_S["device"] * gpu_e2e.SAFETY)
    budget.record("device", 2.0)
    assert budget.estimate("device") == pytest.approx(2.0 * gpu_e2e.SAFETY)


def metrics_file(path: Path, step_s: list[float], wait_s: list[float]) -> None:
    records = [
        {"step": i + 1, "loss": 10.0 - i, "tokens": 1000 + i, "samples": 10, "step_time_s": s, "data_wait_s": w,
         "data_wait_share": w / s, "tokens_per_s": (1000 + i) / s}
        for i, (s, w) in enumerate(zip(step_s, wait_s, strict=True))
    ]  # fmt: skip
    records.insert(2, {"step": 2, "eval_loss": 9.0})  # an eval record has no tokens_per_s
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_read_metrics_leaves_the_warmup_out(tmp_path):
    metrics_file(tmp_path / "metrics.jsonl", [5.0, 4.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.1, 0.0, 0.1])
    figures = gpu_e2e.read_metrics(tmp_path, warmup=2)
    assert figures["timed_steps"] == 3
    assert figures["median_step_s"] == 1.0
    assert figures["tokens_per_s"] == round(statistics_median([1002 / 1.0, 1003 / 2.0, 1004 / 1.0]))
    assert figures["mean_tokens_per_sequence"] == pytest.approx((1002 + 1003 + 1004) / 30, abs=0.05)
    assert figures["data_wait_share"] == pytest.approx(0.2 / 4.0)
    assert figures["loss_first_last"] == [10.0, 6.0]
    assert len(figures["step_times_s"]) == 5
    with pytest.raises(ValueError, match="run more steps"):
        gpu_e2e.read_metrics(tmp_path, warmup=5)


def statistics_median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def test_mfu_against_datasheet_and_measured_rate():
    figures = gpu_e2e.mfu_figures(1e5, 1e9, datasheet=1e15, measured=5e14)
    assert figures == {"model_tflops_per_s": 100.0, "mfu": 0.1, "mfu_of_measured_bf16_rate": 0.2}
    assert gpu_e2e.mfu_figures(1e5, 1e9, None, None)["mfu"] is None


def test_peak_hook_records_the_rank_and_runs_the_sitecustomize_it_shadows(tmp_path):
    hook = gpu_e2e.write_peak_hook(tmp_path / "hook")
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text(f"open({str(tmp_path / 'chained')!r}, 'w').close()\n")
    rank = tmp_path / "bert" / "pretrain" / "__main__.py"
    rank.parent.mkdir(parents=True)
    rank.write_text("x = [0] * 1000\n")
    peaks = tmp_path / "peaks"
    peaks.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{other}", gpu_e2e.PEAK_HOOK_ENV: str(peaks)}
    subprocess.run([sys.executable, str(rank)], env=env, check=True, timeout=60)
    assert (tmp_path / "chained").exists()
    peak = gpu_e2e.read_peak(peaks)
    assert peak["peak_host_rss_gib"] > 0
    assert "peak_memory_gib" not in peak  # no CUDA in that process: no GPU figure
    assert "not recorded" in gpu_e2e.read_peak(tmp_path / "hook")["peak_memory"]


def test_group_documents_joins_consecutive_documents(tmp_path):
    (tmp_path / "part-00000.txt").write_bytes(b"a one.\n\nb two.\n\nc three.\n\n")
    assert gpu_e2e.group_documents(tmp_path, 2) == 2
    assert (tmp_path / "part-00000.txt").read_bytes() == b"a one.\nb two.\n\nc three.\n\n"
    with pytest.raises(ValueError, match="at least 1"):
        gpu_e2e.group_documents(tmp_path, 0)


def test_dry_run_arguments_summary_and_skips(tmp_path, monkeypatch):
    for name in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES"):  # a dry run sets both: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    args = gpu.parse_args(["--dry-run", "--out", str(tmp_path), "--e2e-batch", "base-512=2"])
    assert (args.device, args.model, args.e2e_steps, args.e2e_warmup) == ("cpu", "tiny", 3, 1)
    assert gpu.e2e_shapes(args)["base-512"] == ("tiny", 512, 2)
    args.budget = gpu_e2e.Budget(480)
    assert gpu.skip_reason(args, "step") == "needs a CUDA device"
    assert gpu.skip_reason(args, "finetune") == "no --cola given"
    assert "dry run" in gpu.skip_reason(args, "pretrain")
    assert gpu.skip_reason(args, "device") is None
    skipped = {"parts": {"base-512/ours": {"skipped": "time budget: 3 s left"}}}
    assert "counterpart was skipped" in gpu.skip_reason(args, "base-512/transformers", skipped)
    with pytest.raises(ValueError, match="CONFIG=SIZE"):
        gpu.e2e_shapes(gpu.parse_args(["--out", str(tmp_path), "--e2e-batch", "huge-128=8"]))
    report = {"parts": {"base-128/ours": {"tokens_per_s": 300, "mfu": 0.4},
                        "base-128/transformers": {"tokens_per_s": 100, "mfu": 0.13},
                        "large-512/ours": {"skipped": "time budget: 10 s left"}}}  # fmt: skip
    summary = gpu.e2e_summary(report)
    assert summary["base-128"]["ours_vs_transformers"] == 3.0
    assert summary["large-512"]["ours"] == {"not_measured": "time budget: 10 s left"}
    assert "large-128" not in summary


def test_kill_tree_reaches_a_child_in_its_own_session(tmp_path):
    import shutil
    import time

    import psutil

    if shutil.which("setsid") is None:
        pytest.skip("no setsid here")
    pid_file = tmp_path / "child.pid"
    # the launcher starts its ranks so (a session of their own): a kill of the launcher alone would leave them
    script = f"setsid sleep 600 & echo $! > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; sleep 600"
    parent = subprocess.Popen(["sh", "-c", script])
    while not pid_file.exists():  # the parent writes it as soon as the child runs
        assert parent.poll() is None, "the parent exited before starting its child"
        time.sleep(0.01)
    child = psutil.Process(int(pid_file.read_text()))
    assert child.ppid() == parent.pid and os.getsid(child.pid) != os.getsid(parent.pid)
    gpu_e2e.kill_tree(parent)
    assert parent.poll() is not None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_variant_settings_merge_over_the_fast_ones_and_leave_them_alone():
    settings = gpu_e2e.variant_settings("no-dropout")
    assert settings["model_overrides"] == {
        **gpu_e2e.FAST_SETTINGS["model_overrides"],
        "hidden_dropout_prob": 0.0,
    }
    cuda_graphs = gpu_e2e.variant_settings("cudagraphs")
    assert (
        cuda_graphs["compile_options"] == {"triton.cudagraphs": True}
        and cuda_graphs["pack_multiple_of"] == 1024
    )
    assert "hidden_dropout_prob" not in gpu_e2e.FAST_SETTINGS["model_overrides"]  # a copy was changed
    from bert.pretrain.config import TrainConfig

    for side in gpu_e2e.VARIANTS:  # each is a training config bertpipe accepts
        TrainConfig(examples="e", out="o", max_steps=1, **gpu_e2e.variant_settings(side))


def test_layer_kernels_times_each_setting_against_the_default(tmp_path):
    import layer_kernels

    out = tmp_path / "layer.json"
    report = layer_kernels.main(["--tokens", "64", "--hidden", "32", "--heads", "2", "--iters", "2", "--warmup", "1",
                                 "--variants", "default,no-dropout,eager", "--backend", "aot_eager",
                                 "--out", str(out)])  # fmt: skip
    assert (
        json.loads(out.read_text()) == report
    )  # written after each setting: a cut run keeps what it measured
    results = report["results"]
    assert list(results) == ["default", "no-dropout", "eager"]
    for name, result in results.items():
        assert result["median_ms"] > 0 and result["top"], name
    assert results["default"]["vs_default"] == 1.0 and results["no-dropout"]["model_overrides"] == {
        "hidden_dropout_prob": 0.0
    }
    skipped = layer_kernels.main(["--tokens", "64", "--hidden", "32", "--heads", "2", "--iters", "1", "--warmup", "0",
                                  "--variants", "eager,default", "--backend", "aot_eager", "--budget-s", "0"])  # fmt: skip
    assert "skipped" in skipped["results"]["default"]
    with pytest.raises(SystemExit):
        layer_kernels.main(["--variants", "defualt"])


def test_cuda_graph_lines_count_what_inductor_recorded_and_skipped(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "[rank0]: V1204 [0/0] [__cudagraphs] [0/0] Recording cudagraph tree for symint key 31744\n"
        "[rank0]: V1204 [0/0] [__cudagraphs] [0/0] Recording cudagraph tree for symint key 32768\n"
        "[rank0]: W1204 [__cudagraphs] skipping cudagraphs due to cpu device (arg5_1)\n"
        "22:13:15 [rank 0] WARNING bert.pretrain: compile_options asked for CUDA graphs, but Inductor ran 1 ...\n"
    )
    figures = gpu_e2e.cuda_graph_lines(log)
    assert figures["trees_recorded"] == 2 and figures["skipped"] == 1 and figures["re_recorded"] == 0
    assert (
        "cpu device" in figures["skip_reasons"][0] and "asked for CUDA graphs" in figures["bertpipe_warning"]
    )


def test_best_variant_keeps_the_model_and_must_beat_ours_clearly():
    def parts(**tokens_per_s):
        return {f"base-128/{side}": {"tokens_per_s": value} for side, value in tokens_per_s.items()}

    assert gpu_e2e.best_variant(parts(ours=100.0, cudagraphs=130.0, **{"aten-rng": 110.0})) == (
        "cudagraphs",
        1.3,
    )
    assert (
        gpu_e2e.best_variant(parts(ours=100.0, **{"no-dropout": 150.0, "aten-rng": 101.0})) is None
    )  # a model change; noise
    assert gpu_e2e.best_variant(parts(cudagraphs=130.0)) is None  # nothing to compare with
    assert (
        gpu_e2e.best_variant({"base-128/ours": {"tokens_per_s": 100.0}, "base-128/tuned": {"error": "x"}})
        is None
    )
    assert "no-dropout" not in gpu_e2e.ADOPTABLE and set(gpu_e2e.ADOPTABLE) < set(gpu_e2e.VARIANTS)


def test_adopt_runs_the_other_configs_ours_with_the_adopted_variant(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from bert.model import BertConfig

    seen = {}

    def fake_run_ours(
        name, examples, model, batch, steps, warmup, settings, work, timeout_s, deepspeed_config=None
    ):
        seen[name] = settings
        return {"tokens_per_s": 1000.0, "mean_tokens_per_sequence": 100.0,
                "_config": BertConfig.preset("tiny", vocab_size=100).to_dict()}  # fmt: skip

    monkeypatch.setattr(gpu_e2e, "run_ours", fake_run_ours)
    args = SimpleNamespace(dry_run=True, e2e_batch="", examples=tmp_path, examples_512=tmp_path, e2e_steps=3,
                           e2e_warmup=1, work=tmp_path, budget=gpu_e2e.Budget(100, {}), peak_flops=None,
                           adopted=("cudagraphs", 1.3))  # fmt: skip
    report = {"parts": {}}
    large = gpu.e2e_part(args, report, "large-128/ours")
    assert large["adopted_variant"] == "cudagraphs"
    assert (
        seen["large-128-ours"]["pack_multiple_of"] == 1024
    )  # the variant's settings, less what the CPU lacks
    report["parts"]["large-128/ours"] = large
    assert gpu.e2e_summary(report)["large-128"]["ours"]["adopted_variant"] == "cudagraphs"
    gpu.e2e_part(args, report, "base-128/ours")  # base-128's own ours stays the reference
    assert "pack_multiple_of" not in seen["base-128-ours"]
