"""The pipeline config: a preset (``configs/pipeline/*.json``) plus ``section.key=value`` overrides, turned into
every stage's typed config before any work starts.

A preset names the corpus inputs and one section per stage; each section holds fields of that stage's own
config (``data_prep.shard.ShardConfig``, ``data_prep.vocab.VocabConfig``,
``data_prep.examples_stage.ExamplesConfig``, ``bert.pretrain.config.TrainConfig`` plus ``num_gpus``/``hostfile``,
and one ``bert.finetune.FinetuneConfig`` per task). Paths between stages (``out``, ``corpus``, ``vocab``,
``examples``, ``model``) belong to the pipeline, not to the sections. Overrides are flat strings, because
``prefect deployment run --params`` replaces nested dicts instead of merging them.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "pipeline"
STAGES = ("shard", "vocab", "examples", "pretrain", "finetune")  # in pipeline order; a preset section each
RETRAIN_SECTIONS = ("retrain", "gate")  # read by flows/retrain_plan.py only; the pipeline ignores them
TOP_LEVEL = ("name", "description", "corpus", *STAGES, *RETRAIN_SECTIONS)
# Set by the pipeline from the run directory; a section may not name them.
PIPELINE_OWNED = {
    "shard": ("inputs", "out", "force"),
    "vocab": ("corpus", "out", "force"),
    "examples": ("corpus", "vocab", "out"),
    "pretrain": ("examples", "out", "vocab", "resume"),
    "finetune": ("out",),  # and "model", which only a pipeline without a pretrain section gives
}
LAUNCH_KEYS = ("num_gpus", "hostfile")  # how to launch pretraining, not what to train


class PipelineConfigError(ValueError):
    """A mistake in a pipeline preset or an override: one line that names the section and the key."""


@dataclass
class StageConfigs:
    """Every stage's typed config for one run directory, built (and so validated) before any stage runs."""

    shard: Any  # data_prep.shard.ShardConfig
    vocab: Any  # data_prep.vocab.VocabConfig
    examples: Any  # data_prep.examples_stage.ExamplesConfig
    pretrain: Any | None  # bert.pretrain.config.TrainConfig, None when the preset does not pretrain
    finetune: list = field(default_factory=list)  # bert.finetune.FinetuneConfig, one per task
    baselines: dict = field(
        default_factory=dict
    )  # task -> baselines fine-tuned beside it (finetune.baselines)
    num_gpus: int | None = None
    hostfile: str | None = None


@dataclass
class PipelineConfig:
    """A pipeline preset: inputs and each stage's settings (plain values, as in the JSON file)."""

    corpus: list[str]  # input paths; relative ones are read from the shared data directory
    shard: dict = field(default_factory=dict)
    vocab: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    pretrain: dict = field(default_factory=dict)
    finetune: list[dict] = field(default_factory=list)
    name: str = "pipeline"
    description: str = ""
    retrain: dict = field(default_factory=dict)  # flows.retrain_plan.RetrainSettings fields
    gate: dict = field(default_factory=dict)  # flows.retrain_plan.GateRule fields

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [p for p in self.corpus.split(",") if p]
        if not self.corpus:
            raise PipelineConfigError('the pipeline config lists no corpus inputs: add paths under "corpus"')
        for section in STAGES:
            if section != "finetune" and not isinstance(getattr(self, section), dict):
                raise PipelineConfigError(f'section "{section}" must be a JSON object of settings')
        if not isinstance(self.finetune, list) or not all(isinstance(t, dict) for t in self.finetune):
            raise PipelineConfigError('section "finetune" must be a list of objects, one per task')
        tasks = [t.get("task") for t in self.finetune]
        if None in tasks:
            raise PipelineConfigError('every "finetune" entry needs a "task" (e.g. "cola")')
        if len(set(tasks)) != len(tasks):
            raise PipelineConfigError(
                f'"finetune" lists a task twice: {tasks}; each task writes finetune-<task>/'
            )

    @classmethod
    def from_dict(cls, values: dict, where: str = "pipeline config") -> PipelineConfig:
        unknown = sorted(set(values) - set(TOP_LEVEL))
        if unknown:
            raise PipelineConfigError(f"{where}: unknown keys {unknown}; known: {sorted(TOP_LEVEL)}")
        return cls(**copy.deepcopy(values))

    @classmethod
    def from_json_file(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        if not path.exists():
            raise PipelineConfigError(f"pipeline config {path} does not exist (presets live in {PRESETS})")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PipelineConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise PipelineConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(values, where=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (``demo`` → configs/pipeline/demo.json) or a path to a pipeline JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return path if path.is_absolute() or path.exists() else REPO / path
    candidate = PRESETS / f"{name_or_path}.json"
    if not candidate.exists():
        known = sorted(p.stem for p in PRESETS.glob("*.json"))
        raise PipelineConfigError(
            f"no pipeline preset {str(name_or_path)!r}: known presets {known}, or a path"
        )
    return candidate


def parse_value(text: str) -> Any:
    """An override's value: JSON when it parses (numbers, true/false/null, lists, objects), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``values`` with each ``section.key=value`` (or ``corpus=a,b``) set; nested keys with more dots.

    ``finetune.KEY=V`` sets KEY for every task, ``finetune.TASK.KEY=V`` (or ``finetune.0.KEY=V``) for one.
    """
    values = copy.deepcopy(values)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PipelineConfigError(
                f"override {override!r} is not section.key=value (e.g. pretrain.lr=1e-3)"
            )
        value = parse_value(text.strip())
        path = key.split(".")
        if path[0] not in TOP_LEVEL:
            raise PipelineConfigError(
                f"override {override!r}: unknown section {path[0]!r}; known: {list(TOP_LEVEL)}"
            )
        if path[0] == "corpus" and isinstance(value, str):
            value = [p for p in value.split(",") if p]
        if len(path) == 1:
            values[path[0]] = value
            continue
        if path[0] in ("name", "description", "corpus"):
            raise PipelineConfigError(f"override {override!r}: {path[0]} has no keys; write {path[0]}=VALUE")
        if path[0] == "finetune":
            tasks = values.setdefault("finetune", [])
            targets = _finetune_targets(tasks, path[1], override)
            rest = path[2:] if targets is not tasks else path[1:]
            if not rest:
                raise PipelineConfigError(f"override {override!r} names a task but no key")
            for task in targets:
                _set(task, rest, value)
        else:
            _set(values.setdefault(path[0], {}), path[1:], value)
    return values


def _finetune_targets(tasks: list[dict], selector: str, override: str) -> list[dict]:
    if selector.isdigit():
        if int(selector) >= len(tasks):
            raise PipelineConfigError(f"override {override!r}: there are only {len(tasks)} finetune tasks")
        return [tasks[int(selector)]]
    named = [t for t in tasks if t.get("task") == selector]
    return named or tasks  # not a task name: a key for every task


def _set(target: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[path[-1]] = value


def load_pipeline_config(preset: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A preset (name or file) with overrides applied, checked at the top level."""
    path = preset_path(preset)
    base = PipelineConfig.from_json_file(path).to_dict()
    values = resolve_package_paths(apply_overrides(base, overrides))
    return PipelineConfig.from_dict(values, where=f"{path} with overrides")


PACKAGE_PREFIX = "package:"


def resolve_package_paths(values: Any) -> Any:
    """``values`` with every string ``package:NAME/PATH`` replaced by PATH inside the installed Python package
    NAME (e.g. a checkpoint shipped as a package), so a preset need not know where site-packages is."""
    if isinstance(values, dict):
        return {key: resolve_package_paths(value) for key, value in values.items()}
    if isinstance(values, list):
        return [resolve_package_paths(value) for value in values]
    if not isinstance(values, str) or not values.startswith(PACKAGE_PREFIX):
        return values
    name, _, inside = values[len(PACKAGE_PREFIX) :].partition("/")
    try:  # find_spec locates the package without running its __init__ (a dotted name imports its parents)
        spec = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PipelineConfigError(
            f"{values!r}: no installed Python package {name!r}; install it into this environment or give the "
            "directory's path instead (package:NAME/PATH names PATH inside package NAME)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / inside)


def default_shared() -> Path:
    """Where the sample data lives: $BERTPIPE_SHARED, else ../shared beside the checkout."""
    return Path(os.environ.get("BERTPIPE_SHARED", REPO.parent / "shared"))


def resolve_input(path: str, shared_data: Path) -> str:
    """Relative paths that do not exist here are read from the shared data directory."""
    p = Path(path)
    if p.is_absolute() or path.startswith("hf://") or p.exists():
        return path
    return str(Path(shared_data) / path)


def resolve_earlier_output(path: str, shared_data: Path) -> str:
    """A path that an earlier run may still have to write (phase 1's model or vocabulary): shared data
    when it is there, else as given (relative to the working directory)."""
    shared = Path(shared_data) / path
    return str(shared) if not Path(path).is_absolute() and shared.exists() else path


def stage_paths(out: Path, config: PipelineConfig) -> dict[str, Path]:
    """Where each stage writes inside the run directory."""
    out = Path(out)
    paths = {name: out / name for name in ("corpus", "vocab", "examples", "pretrain")}
    for task in config.finetune:
        paths[f"finetune-{task['task']}"] = out / f"finetune-{task['task']}"
    return paths


def _build(section: str, cls: type, settings: dict, owned: dict) -> Any:
    """``cls(**owned, **settings)`` with unknown keys and bad values reported as one line naming the section."""
    pipeline_owned = set(owned) | set(PIPELINE_OWNED.get(section.split("[")[0], ()))
    allowed = {f.name for f in dataclasses.fields(cls)} - pipeline_owned
    for key in settings:
        if key in pipeline_owned:
            raise PipelineConfigError(
                f'section "{section}": "{key}" is set by the pipeline from the run directory; remove it'
            )
        if key not in allowed:
            raise PipelineConfigError(
                f'section "{section}": unknown key "{key}"; known keys: {", ".join(sorted(allowed))}'
            )
    try:
        return cls(**owned, **settings)
    except (TypeError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, even for multi-problem messages
        raise PipelineConfigError(f'section "{section}": {message}') from None


def build_stage_configs(config: PipelineConfig, shared_data: str | Path, out: str | Path) -> StageConfigs:
    """Every stage's typed config for a run in ``out``: any mistake is a PipelineConfigError, before work."""
    from bert.finetune import FinetuneConfig
    from bert.pretrain.config import TrainConfig
    from data_prep.examples_stage import ExamplesConfig
    from data_prep.shard import ShardConfig
    from data_prep.vocab import VocabConfig

    shared_data, paths = Path(shared_data), stage_paths(out, config)
    shard = _build(
        "shard",
        ShardConfig,
        config.shard,
        {"inputs": [resolve_input(p, shared_data) for p in config.corpus], "out": str(paths["corpus"])},
    )
    vocab_settings = dict(config.vocab)
    if vocab_settings.get("from_path"):
        vocab_settings["from_path"] = resolve_earlier_output(vocab_settings["from_path"], shared_data)
    vocab = _build(
        "vocab", VocabConfig, vocab_settings, {"corpus": str(paths["corpus"]), "out": str(paths["vocab"])}
    )
    examples = _build(
        "examples",
        ExamplesConfig,
        config.examples,
        {"corpus": paths["corpus"], "vocab": paths["vocab"], "out": paths["examples"]},
    )
    pretrain, launch = None, {}
    if config.pretrain:
        settings = dict(config.pretrain)
        launch = {key: settings.pop(key) for key in LAUNCH_KEYS if key in settings}
        if settings.get("deepspeed_config"):
            settings["deepspeed_config"] = _repo_path(settings["deepspeed_config"])
        if settings.get("init_from"):
            settings["init_from"] = resolve_earlier_output(settings["init_from"], shared_data)
        pretrain = _build(
            "pretrain",
            TrainConfig,
            settings,
            {"examples": str(paths["examples"]), "out": str(paths["pretrain"]), "vocab": str(paths["vocab"])},
        )
        num_gpus = launch.get("num_gpus")
        if num_gpus is not None and (not isinstance(num_gpus, int) or num_gpus < 1):
            raise PipelineConfigError(
                f'section "pretrain": num_gpus must be a positive integer, got {num_gpus!r}'
            )
        if num_gpus is not None and launch.get("hostfile"):
            raise PipelineConfigError('section "pretrain": give num_gpus or hostfile, not both')
    model = paths["pretrain"] / "hf"
    finetune, baselines = [], {}
    for i, task in enumerate(config.finetune):
        settings = dict(task)
        for key in ("train", "eval"):
            if settings.get(key):
                settings[key] = resolve_input(str(settings[key]), shared_data)
        if isinstance(settings.get("seeds"), list):
            settings["seeds"] = tuple(settings["seeds"])
        if isinstance(settings.get("text_columns"), list):
            settings["text_columns"] = tuple(settings["text_columns"])
        where = f'section "finetune[{i}]" ({task["task"]})'
        if "baselines" in settings:
            baselines[task["task"]] = _baselines(settings.pop("baselines"), shared_data, where)
        if config.pretrain and "model" in settings:
            raise PipelineConfigError(f'{where}: "model" is the pretrain stage\'s export here; remove it')
        if not config.pretrain and "model" not in settings:
            raise PipelineConfigError(f'{where}: without a pretrain section give "model" (an HF directory)')
        model_dir = (
            resolve_input(str(settings.pop("model")), shared_data) if "model" in settings else str(model)
        )
        owned = {"model": model_dir, "out": str(paths[f"finetune-{task['task']}"])}
        finetune.append(_build(f"finetune[{i}]", FinetuneConfig, settings, owned))
    return StageConfigs(shard=shard, vocab=vocab, examples=examples, pretrain=pretrain, finetune=finetune,
                        baselines=baselines, num_gpus=launch.get("num_gpus"),
                        hostfile=launch.get("hostfile"))  # fmt: skip


def _baselines(value: Any, shared_data: Path, where: str) -> list[str]:
    """A task's ``baselines``: "random-init" and model directories (relative ones read from the shared data)."""
    from bert.finetune.baselines import RANDOM_INIT, check_baselines

    try:
        names = check_baselines(value)
    except ValueError as e:
        raise PipelineConfigError(f"{where}: {e}") from None
    return [b if b == RANDOM_INIT else resolve_input(b, shared_data) for b in names]


def check_before_work(
    config: PipelineConfig, configs: StageConfigs, shared_data: str | Path, stages: tuple[str, ...] = STAGES
) -> None:
    """What the ``stages`` to run would fail on later, refused now in one line (PipelineConfigError): their
    input files exist and parse, the DeepSpeed JSON agrees with the training config, the ranks fit this machine.

    Apart from ``build_stage_configs``: a phase-2 preset names phase 1's outputs, which exist only once phase 1
    has run.
    """
    if "shard" in stages:
        for path in configs.shard.inputs:
            if not path.startswith("hf://") and not Path(path).exists():
                raise PipelineConfigError(
                    f'corpus input {path} does not exist: fix "corpus" (relative paths are read from {shared_data})'
                )
    if "vocab" in stages and configs.vocab.from_path and not Path(configs.vocab.from_path).exists():
        raise PipelineConfigError(
            f'section "vocab": from_path {configs.vocab.from_path} does not exist: give a vocab.txt or a '
            "tokenizer directory (phase 1's vocab/)"
        )
    if "pretrain" in stages and configs.pretrain is not None:
        _check_pretrain(configs)
    if "finetune" in stages:
        pretrained_here = "pretrain" in stages and configs.pretrain is not None
        for i, task in enumerate(configs.finetune):
            where = f'section "finetune[{i}]" ({task.task})'
            for key in ("train", "eval"):
                path = getattr(task, key)
                if path is not None and not Path(path).exists():
                    raise PipelineConfigError(f"{where}: {key} file {path} does not exist")
            for baseline in configs.baselines.get(task.task, []):
                if baseline != "random-init" and not (Path(baseline) / "config.json").is_file():
                    raise PipelineConfigError(
                        f"{where}: the baseline {baseline} is not a Hugging Face directory (no config.json): "
                        'fix "baselines" (a model directory, or "random-init")'
                    )
            if not pretrained_here and not (Path(task.model) / "config.json").is_file():
                raise PipelineConfigError(
                    f"{where}: the model {task.model} is not a Hugging Face directory (no config.json): "
                    + ("run the pretrain stage first" if configs.pretrain is not None else 'fix "model"')
                )


def _check_pretrain(configs: StageConfigs) -> None:
    """The pretrain section before its examples exist: model, batch arithmetic, DeepSpeed JSON, devices."""
    from bert.pretrain.launch import check_pretrain_launch, planned_model_config

    try:
        check_pretrain_launch(configs.pretrain, configs.num_gpus, configs.hostfile)
        model = planned_model_config(configs.pretrain)
    except (ValueError, OSError) as e:  # OSError: a file that is there but cannot be read
        message = " ".join(str(e).split())  # one line, even for multi-problem messages
        raise PipelineConfigError(f'section "pretrain": {message}') from None
    if configs.examples.max_seq_length > model.max_position_embeddings:
        raise PipelineConfigError(
            f'section "examples": max_seq_length {configs.examples.max_seq_length} exceeds the model\'s '
            f"{model.max_position_embeddings} positions: shorten it, or give the model more "
            "(pretrain.model_overrides.max_position_embeddings)"
        )


def _repo_path(path: str) -> str:
    """DeepSpeed configs named relative to the repository work from any directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    return str(REPO / p) if (REPO / p).exists() else path
