"""Stages run through a mapper: jobs carry their own state, so spawned processes and Dask workers give the
same bytes as the default path."""

from __future__ import annotations

import logging
import multiprocessing
import operator
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from data_prep import shard as shard_mod
from data_prep.examples_stage import CONTEXT_FILE, ExamplesConfig, generate_examples
from data_prep.manifest import MANIFEST, sha256_file
from data_prep.parallel import local_mapper, map_inline
from data_prep.shard import ShardConfig, shard_corpus
from data_prep.vocab import VocabConfig, load_vocab, train_vocab

NUM_FILES = 6


def _digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but the manifest (compared apart from its timing fields)."""
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _without_timing(manifest: dict) -> dict:
    manifest = {k: v for k, v in manifest.items() if k != "created_at"}
    manifest["stats"] = {k: v for k, v in manifest["stats"].items() if k != "seconds"}
    return manifest


def _shard_config(inputs: list[Path], out: Path) -> ShardConfig:
    return ShardConfig(
        inputs=[str(p) for p in inputs], out=str(out), num_shards=2, doc_boundary="file", valid_fraction=0.3
    )


def _examples_config(corpus: Path, vocab: Path, root: Path, name: str) -> ExamplesConfig:
    return ExamplesConfig(
        corpus,
        vocab,
        root / f"{name}-examples",
        max_seq_length=64,
        dupe_factor=2,
        whole_word_mask=True,  # the context then carries the continuation table too
        cache_dir=root / f"{name}-cache",
    )


@pytest.fixture(autouse=True)
def one_read_task_per_file(monkeypatch):
    # The inputs are a few small files: without this they would form a single read task. Tasks are grouped
    # in the parent, so the patch holds for jobs run in other processes too.
    monkeypatch.setattr(shard_mod, "TASK_MIN_BYTES", 1)


@pytest.fixture(scope="module")
def reference(shared_data, tmp_path_factory) -> dict:
    """The default path (workers=1) over a few inaugural speeches: shard, vocab, examples."""
    root = tmp_path_factory.mktemp("reference")
    inputs = sorted((shared_data / "corpus" / "inaugural").glob("*.txt"))[:NUM_FILES]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_mod, "TASK_MIN_BYTES", 1)
        corpus = shard_corpus(_shard_config(inputs, root / "corpus"))
    train_vocab(VocabConfig(corpus=str(root / "corpus"), out=str(root / "vocab"), vocab_size=600))
    config = _examples_config(root / "corpus", root / "vocab", root, "ref")
    examples = generate_examples(config)
    return {"inputs": inputs, "vocab": root / "vocab", "corpus": corpus, "examples": examples, "root": root}


def _run_mapped(reference: dict, root: Path, map_jobs) -> None:
    """Both stages through ``map_jobs``; asserts every output byte and manifest equals the reference."""
    corpus = shard_corpus(_shard_config(reference["inputs"], root / "corpus"), map_jobs=map_jobs)
    assert _without_timing(corpus) == _without_timing(reference["corpus"])
    assert _digests(root / "corpus") == _digests(reference["root"] / "corpus")

    examples = generate_examples(
        _examples_config(root / "corpus", reference["vocab"], root, "mapped"), map_jobs=map_jobs
    )
    assert _without_timing(examples) == _without_timing(reference["examples"])
    ref_root = reference["root"]
    assert _digests(root / "mapped-examples") == _digests(ref_root / "ref-examples")
    assert _digests(root / "mapped-cache") == _digests(ref_root / "ref-cache")  # tokenised elsewhere too


def _expected_calls(reference: dict) -> list[tuple[str, int]]:
    tokenised = len([f for f in reference["corpus"]["files"] if f["rows"]])
    parts = len([f for f in reference["examples"]["files"] if f["path"].endswith(".arrow")])
    return [
        ("read_task", NUM_FILES),
        ("write_shard", 2),
        ("build_shard_cache", tokenised),
        ("_generate_part", parts),
    ]


def test_jobs_in_spawned_processes_match_the_default_path(reference, tmp_path):
    calls = []
    # spawn: the workers start fresh and import the job's module; nothing is inherited from this process
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:

        def map_spawned(fn, jobs, desc):
            calls.append((fn.__name__, len(jobs)))
            sizes[fn.__name__] = max(len(pickle.dumps(job)) for job in jobs)
            return [f.result() for f in [pool.submit(fn, *job) for job in jobs]]

        sizes = {}
        _run_mapped(reference, tmp_path, map_spawned)
    assert calls == _expected_calls(reference)  # every job went through the mapper
    assert all(count >= 2 for _, count in calls)
    # a part job carries the path of the shared context (negative pools, vocabulary), not a copy of it;
    # the file is gone once the stage is done
    assert sizes["_generate_part"] < 4096, sizes
    assert not (tmp_path / "mapped-examples" / CONTEXT_FILE).exists()


@pytest.mark.slow
@pytest.mark.slow
def test_jobs_on_a_dask_cluster_match_the_default_path(reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    calls = []
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):

        def map_on_dask(fn, jobs, desc):
            calls.append((fn.__name__, len(jobs)))
            return client.gather(client.map(fn, *zip(*jobs, strict=True), pure=False)) if jobs else []

        _run_mapped(reference, tmp_path, map_on_dask)
        ran_on = client.run(lambda: 1)
    assert calls == _expected_calls(reference)
    assert len(ran_on) == 2  # two worker processes were there to take the jobs


def test_loaded_vocab_pickles_to_the_same_tokenizer(reference):
    vocab = load_vocab(reference["vocab"])
    copy = pickle.loads(pickle.dumps(vocab))
    text = "Fellow citizens of the Senate and of the House of Representatives, unprecedented."
    assert copy.fingerprint == vocab.fingerprint and copy.tokens == vocab.tokens
    assert copy.special_ids == vocab.special_ids and copy.lowercase == vocab.lowercase
    ids = vocab.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids and copy.tokenizer.encode(text, add_special_tokens=False).ids == ids


@pytest.mark.parametrize(("workers", "start_method"), [(1, "fork"), (2, "fork"), (2, "forkserver")])
def test_local_mappers_keep_job_order_and_raise_job_errors(workers, start_method):
    jobs = [(i, 7) for i in range(9)]
    with local_mapper(workers, start_method=start_method) as map_jobs:
        assert map_jobs(operator.mod, jobs, "test") == [i % 7 for i in range(9)]
        assert map_jobs(operator.mod, [], "test") == []
        with pytest.raises(ZeroDivisionError):
            map_jobs(operator.mod, [(1, 1), (1, 0), (2, 1)], "test")


def test_map_inline_and_bad_start_method():
    assert map_inline(divmod, [(7, 2), (9, 4)], "test") == [(3, 1), (2, 1)]
    with pytest.raises(ValueError, match="start_method"), local_mapper(2, start_method="thread"):
        pass


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.slow
def test_workers_die_when_the_parent_is_killed(start_method):
    """kill -9 of the process running a stage leaves no worker behind (the kernel kills them with it)."""
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    script = ("import time; from data_prep.parallel import local_mapper\n"
              f"with local_mapper(2, {start_method!r}) as map_jobs:\n"
              "    map_jobs(time.sleep, [(120,), (120,)], 'sleep')\n")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline, workers = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            workers = [p for p in psutil.Process(parent.pid).children(recursive=True)
                       if "sleep" not in p.name()]  # fmt: skip
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert len(workers) >= 2, "the pool did not start"
        time.sleep(1.0)  # the workers are inside their jobs
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_a_part_context_rewritten_at_the_same_path_is_loaded_anew(tmp_path):
    """A process that ran an earlier examples stage (the flow's own, run again with another masking rate)
    must not keep that stage's context because the new pickle has the same path and size."""
    from data_prep.examples_stage import _ContextFile

    path = tmp_path / CONTEXT_FILE
    first = _ContextFile.write({"masked_lm_prob": 0.15}, path)
    assert first.load() == {"masked_lm_prob": 0.15}
    second = _ContextFile.write({"masked_lm_prob": 0.25}, path)
    assert path.stat().st_size == len(
        pickle.dumps({"masked_lm_prob": 0.15}, protocol=pickle.HIGHEST_PROTOCOL)
    )
    assert second.load() == {"masked_lm_prob": 0.25}
