"""Pretraining as a stage: a fingerprint known before training, a manifest written when the run is complete.

The fingerprint covers everything that decides the final weights: the examples' fingerprint (which covers
the corpus and the vocabulary), the model (preset or config file content, overrides), every optimizer,
schedule, batch and precision setting, the DeepSpeed JSON's content, the ``init_from`` weights' sha256 and
how long to train. It leaves out how the run is watched or launched (logging, checkpoint cadence, number of
ranks). ``manifest.json`` is written, last, only when training reached ``max_steps`` (or, without
``max_steps``, used up its time budget); a run stopped earlier is resumable, not complete.

A run directory is resumed only by a run on the same *trajectory* — the fingerprint's settings without
``max_steps`` and ``time_budget`` — so a run can be extended to more steps when its schedule length
(``schedule_steps``) was fixed. ``.inprogress.json`` records the trajectory of the checkpoints on disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bert.model.hf import WEIGHT_FILES
from bert.pretrain.config import TrainConfig
from bert.pretrain.run import holds_checkpoints, refuse_existing_checkpoints
from data_prep.manifest import (
    INPROGRESS,
    MANIFEST,
    Stage,
    StageError,
    acquire_writer_lock,
    check_output_directory,
    clear_directory,
    complete_manifest,
    file_entry,
    fingerprint,
    read_json,
    read_manifest,
    release_writer_lock,
    require_complete,
    sha256_file,
    stage_fingerprint,
    write_json_atomic,
)

if TYPE_CHECKING:
    from bert.pretrain.launch import Nodes

log = logging.getLogger("bert.pretrain.stage")

STAGE = "pretrain"
FORMAT_VERSION = 1
# Settings that change how a run is watched, not its weights.
NOT_IN_FINGERPRINT = ("examples", "out", "vocab", "resume", "save_every", "keep_last", "export_every",
                      "eval_every", "eval_samples", "log_every", "log_example_indices", "progress_bar",
                      "tensorboard", "model_config", "init_from", "deepspeed_config",
                      "compile", "compile_options", "pack_multiple_of", "profile_steps")  # fmt: skip  # compile changes float rounding only, like the number of ranks; packing to a multiple, random draws only
LENGTH = ("max_steps", "time_budget")


def _file_or_name(spec: str) -> str:
    """A preset name as it is; a config file (or HF directory) by the sha256 of its config.json."""
    path = Path(spec)
    config_file = path / "config.json" if path.is_dir() else path
    return f"sha256:{sha256_file(config_file)}" if config_file.is_file() else spec


def _init_weights(init_from: str | None) -> str | None:
    if init_from is None:
        return None
    from bert.pretrain.run import resolve_init

    directory = resolve_init(init_from)
    for name in WEIGHT_FILES:
        if (directory / name).exists():
            return sha256_file(directory / name)
    raise ValueError(f"--init-from {directory} holds no weights ({' or '.join(WEIGHT_FILES)})")


def stage_config(config: TrainConfig) -> dict:
    """The settings of the fingerprint: what decides the final weights, no paths."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_FINGERPRINT}
    values["model"] = _file_or_name(config.model_config)
    if config.max_steps is not None:
        values["time_budget"] = None  # with max_steps, the budget only decides where a run pauses
    return json.loads(json.dumps(values))  # as it reads back from JSON (tuples are lists)


def stage_inputs(config: TrainConfig) -> dict[str, str | None]:
    """The inputs' fingerprints: examples (corpus + vocabulary), DeepSpeed JSON, init weights."""
    from bert.pretrain.ds_config import load_deepspeed_config

    examples = require_complete(config.examples, "examples")
    return {
        "examples": examples["fingerprint"],
        "deepspeed": fingerprint(load_deepspeed_config(config.deepspeed_config)),
        "init_from": _init_weights(config.init_from),
    }


def trajectory(config_values: dict, inputs: dict) -> str:
    """Fingerprint of everything but the run length: checkpoints on the same trajectory can be continued."""
    return fingerprint(
        {"config": {k: v for k, v in config_values.items() if k not in LENGTH}, "inputs": inputs}
    )


def expected_fingerprint(config: TrainConfig) -> str:
    """The fingerprint a complete run of ``config`` has; computable before training (examples must exist)."""
    return stage_fingerprint(STAGE, stage_config(config), stage_inputs(config), FORMAT_VERSION)


INPUT_NAMES = {"examples": "the examples", "deepspeed": "the DeepSpeed JSON's settings",
               "init_from": "the --init-from weights"}  # fmt: skip


def _differences(record: dict, values: dict, inputs: dict) -> list[str]:
    """What differs between the run ``record`` describes and ``values``/``inputs``: settings, then inputs."""
    old = record.get("config") or {}
    if not old and not record.get("inputs"):
        return ["(a run from before stage manifests)"]
    keys = sorted((set(old) | set(values)) - set(LENGTH))  # the run length never blocks a resume
    changed = [f"{k}: {old.get(k)!r} → {values.get(k)!r}" for k in keys if old.get(k) != values.get(k)]
    old_inputs = record.get("inputs") or {}
    changed += [f"{INPUT_NAMES.get(k, k)} changed" for k in inputs if old_inputs.get(k) != inputs[k]]
    return changed or ["(a run from before stage manifests)"]


def _other_settings(out: Path, changed: list[str]) -> StageError:
    return StageError(
        f"{out} holds checkpoints of a run with other settings ({'; '.join(changed[:6])}): "
        "choose a new --out, or start from its weights with --init-from"
    )


def prepare(config: TrainConfig, resume: bool | None = None) -> tuple[TrainConfig, dict | None]:
    """Decide how to run ``config``: (config with ``resume`` set, the manifest when already complete).

    ``resume=None`` (the pipeline): continue checkpoints on the same trajectory, clear a run directory of
    this stage that holds another one. ``resume=True/False`` (the CLI): as asked; continuing checkpoints of
    another trajectory is refused with the settings that differ.
    """
    out = Path(config.out)
    check_output_directory(out)
    values, inputs = stage_config(config), stage_inputs(config)
    fp = stage_fingerprint(STAGE, values, inputs, FORMAT_VERSION)
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("stage") != STAGE:
        raise StageError(f"{out} holds a finished '{manifest.get('stage')}' stage: choose another --out")
    if (complete := complete_manifest(out, STAGE, fp)) is not None:
        return config, complete
    wanted = trajectory(values, inputs)
    record = read_json(out / INPROGRESS) or (manifest or {})
    has_checkpoints = holds_checkpoints(out)
    same = record.get("trajectory") == wanted
    if has_checkpoints and not same:
        changed = _differences(record, values, inputs)
        if resume is None and record:  # the pipeline's own directory: these settings replace it
            log.info(
                "pretrain: %s holds a run with other settings (%s); starting over", out, "; ".join(changed)
            )
            clear_directory(out)
            has_checkpoints = False
        else:
            raise _other_settings(out, changed)
    if has_checkpoints and resume is False:
        refuse_existing_checkpoints(out)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory is not complete
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / INPROGRESS,
        {"stage": STAGE, "fingerprint": fp, "trajectory": wanted, "config": values, "inputs": inputs},
    )
    return dataclasses.replace(config, resume=has_checkpoints), None


def is_complete(config: TrainConfig, result) -> bool:
    """A run is complete when it reached max_steps (or, without max_steps, used its time budget)."""
    if config.max_steps is not None:
        return result.stop_reason == "max_steps" and result.step >= config.max_steps
    return result.stop_reason == "time_budget"


def commit(config: TrainConfig, result, seconds: float) -> dict:
    """Write the manifest of a complete run: the HF export's files with their sha256, the last metrics.

    The fingerprint and its parts are the ones ``prepare`` recorded when the run started (no input is
    hashed again)."""
    out = Path(config.out)
    record = read_json(out / INPROGRESS)
    stage = Stage(out, STAGE, record["fingerprint"], record["config"], record["inputs"], FORMAT_VERSION,
                  complete=False)  # fmt: skip
    files = [file_entry(out, str(p.relative_to(out))) for p in sorted((out / "hf").iterdir()) if p.is_file()]
    stats = {"step": result.step, "stop_reason": result.stop_reason, "metrics": result.metrics,
             "eval_metrics": result.eval_metrics, "seconds": round(seconds, 2)}  # fmt: skip
    return stage.commit(files, stats, extra={"trajectory": record["trajectory"], "hf_dir": "hf"})


def follow(config: TrainConfig, resume: bool | None = None) -> tuple[TrainConfig, dict | None]:
    """``prepare`` for a node other than node 0 (one launch per node): the same decisions, nothing written.

    Node 0 holds the writer lock and writes .inprogress.json and the manifest. This node returns the complete
    manifest when node 0 will find one (and start no ranks), refuses what node 0 refuses (rather than wait for
    ranks that never come), and lets its ranks resume from whatever checkpoint node 0's ranks resume from: the
    ranks read it after they all met, so after node 0 has prepared the directory.
    """
    out = Path(config.out)
    check_output_directory(out)
    values, inputs = stage_config(config), stage_inputs(config)
    manifest = read_manifest(out)
    fp = stage_fingerprint(STAGE, values, inputs, FORMAT_VERSION)
    if (complete := complete_manifest(out, STAGE, fp)) is not None:
        return config, complete
    # resume=None (the pipeline): node 0 continues this trajectory's checkpoints or clears the directory; the
    # ranks find either when they look.
    if resume is not None and holds_checkpoints(out):
        record = read_json(out / INPROGRESS) or (manifest or {})
        if record.get("trajectory") != trajectory(values, inputs):
            raise _other_settings(out, _differences(record, values, inputs))
        if not resume:
            refuse_existing_checkpoints(out)
    return dataclasses.replace(config, resume=resume is not False), None


def run_pretrain_stage(
    config: TrainConfig,
    num_gpus: int | None = None,
    hostfile: str | None = None,
    resume: bool | None = None,
    nodes: Nodes | None = None,
    **launch_options,
) -> tuple[dict | None, object | None]:
    """Run pretraining as a stage: (manifest or None when the run stopped early, the launch result).

    A complete run of the same config returns its manifest at once (result None). ``nodes``
    (``bert.pretrain.launch.Nodes``): this is one launch per node; node 0 runs the stage as on one node, another node
    only runs its ranks and returns (None, None) when they are done (``follow``). ``launch_options`` go to
    ``bert.pretrain.launch.launch`` (master_port, on_line, stop_event, deadline_s, ...).
    """
    from bert.pretrain.launch import launch

    if nodes is not None and nodes.node_rank > 0:  # no lock: node 0's launch holds it for the whole run
        config, manifest = follow(config, resume)
        if manifest is not None:
            return manifest, None
        return None, launch(config, num_gpus=num_gpus, hostfile=hostfile, nodes=nodes, **launch_options)
    # One trainer per run directory: a second one is refused, naming the first.
    acquire_writer_lock(config.out)
    try:
        config, manifest = prepare(config, resume)
        if manifest is not None:
            log.info("pretrain: %s is complete for these settings (step %s); nothing to do",
                     config.out, manifest["stats"].get("step"))  # fmt: skip
            return manifest, None
        started = time.monotonic()
        result = launch(config, num_gpus=num_gpus, hostfile=hostfile, nodes=nodes, **launch_options)
        if not is_complete(config, result):
            return None, result
        return commit(config, result, time.monotonic() - started), result
    finally:
        release_writer_lock(config.out)
