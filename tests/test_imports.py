"""The import contract of DESIGN.md ("Layout"): which part of the house may import which.

``flows`` → ``bert``, ``data_prep``; inside ``bert``: ``model`` ← ``optim`` ← {``pretrain``, ``finetune``}, and
``pretrain`` and ``finetune`` never import each other; the parent side of pretraining never imports the rank
loop or the engine; only the engine imports deepspeed; only ``flows`` imports prefect, mlflow and typer;
``data_prep`` imports nothing internal above it; no import circles. Read from the source (every import
statement, also those inside functions; those under ``if TYPE_CHECKING:`` never run and are left out).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "bert", "flows")
BERT_MAY_USE = {
    "data_prep.schema",
    "data_prep.manifest",
    "data_prep.vocab",
    "data_prep.masking",
    "data_prep.zh_words",
}
PARENT_SIDE = ("bert.pretrain.stage", "bert.pretrain.launch")
RANK_SIDE = ("bert.pretrain.rank", "bert.pretrain.engine", "bert.pretrain.checkpoint")
FLOWS_ONLY = ("prefect", "prefect_dask", "mlflow", "typer")
PLAIN_FLOWS = ("flows.retrain_plan", "flows.config")  # what the CLI and tests reach without Prefect or MLflow


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


MODULES = module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports (``from a.b import c`` is a.b.c when that is a module, else a.b)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def internal(name: str) -> set[str]:
    return {m for m in GRAPH[name] if m.split(".")[0] in PACKAGES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in internal(todo.pop()):
            if m not in seen and m in MODULES:
                seen.add(m)
                todo.append(m)
    return seen


def within(name: str, *parts: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parts)


def broken_rules() -> list[str]:
    """Every import that breaks a rule, as 'importer → imported: rule'."""
    problems = []
    for name in MODULES:
        for imported in sorted(GRAPH[name]):
            top = imported.split(".")[0]
            if top == "deepspeed" and name != "bert.pretrain.engine":
                problems.append(f"{name} → {imported}: only bert.pretrain.engine imports deepspeed")
            if top in FLOWS_ONLY and not within(name, "flows"):
                problems.append(f"{name} → {imported}: only flows/ imports {', '.join(FLOWS_ONLY)}")
            if top in FLOWS_ONLY and name in PLAIN_FLOWS:
                problems.append(f"{name} → {imported}: {name} is plain planning, reachable without Prefect")
            if top not in PACKAGES:
                continue
            if within(name, "data_prep") and top != "data_prep":
                problems.append(f"{name} → {imported}: data_prep imports nothing above it")
            if within(name, "bert") and top == "flows":
                problems.append(f"{name} → {imported}: bert never imports flows")
            if within(name, "bert") and top == "data_prep" and imported not in BERT_MAY_USE:
                problems.append(f"{name} → {imported}: bert uses only {sorted(BERT_MAY_USE)} of data_prep")
            if within(name, "bert.model") and top == "bert" and not within(imported, "bert.model"):
                problems.append(f"{name} → {imported}: the model imports nothing of bert but itself")
            if within(name, "bert.model") and top == "data_prep":
                problems.append(f"{name} → {imported}: the model is pure torch")
            if name == "bert.optim" and top == "bert" and not within(imported, "bert.model"):
                problems.append(f"{name} → {imported}: optim sits under pretrain and finetune")
            if within(name, "bert.pretrain") and within(imported, "bert.finetune"):
                problems.append(f"{name} → {imported}: pretrain and finetune never import each other")
            if within(name, "bert.finetune") and within(imported, "bert.pretrain"):
                problems.append(f"{name} → {imported}: pretrain and finetune never import each other")
    for parent in PARENT_SIDE:
        for m in sorted(reachable(parent) & set(RANK_SIDE)):
            problems.append(f"{parent} →…→ {m}: the parent side of pretraining never loads the rank side")
    return problems


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each an import circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in internal(v):
            if w not in MODULES or w == v or w == v.rsplit(".", 1)[0]:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in MODULES:
        if v not in index:
            connect(v)
    return found


def test_every_import_keeps_the_layout_rules():
    assert broken_rules() == []


def test_no_import_circles():
    assert cycles() == []


def test_the_graph_sees_the_imports_it_must_see():
    """The checker itself: it reads imports inside functions, and a forbidden edge would be reported."""
    assert "deepspeed" in GRAPH["bert.pretrain.engine"]
    assert "bert.pretrain.run" in GRAPH["bert.pretrain.launch"]
    assert "prefect" in GRAPH["flows.pipeline"]
    assert {"bert.pretrain.stage", "bert.finetune.stage"} <= GRAPH["flows.pipeline"]  # imported inside tasks
    assert "bert.pretrain.engine" not in GRAPH["bert.pretrain.run"]  # only under TYPE_CHECKING
    GRAPH["bert.model.heads"].add("bert.pretrain.data")
    GRAPH["data_prep.shard"].add("bert.model")
    GRAPH["bert.pretrain.run"].add("bert.pretrain.engine")
    GRAPH["bert.pretrain.config"].add("bert.pretrain.engine")
    try:
        problems = "\n".join(broken_rules())
        assert "bert.model.heads → bert.pretrain.data" in problems
        assert "data_prep.shard → bert.model" in problems
        assert "bert.pretrain.stage →…→ bert.pretrain.engine" in problems
        assert any({"bert.pretrain.config", "bert.pretrain.engine"} <= set(c) for c in cycles())  # a circle
    finally:
        GRAPH["bert.model.heads"].discard("bert.pretrain.data")
        GRAPH["data_prep.shard"].discard("bert.model")
        GRAPH["bert.pretrain.run"].discard("bert.pretrain.engine")
        GRAPH["bert.pretrain.config"].discard("bert.pretrain.engine")


@pytest.mark.parametrize("module", ["flows.pipeline", "flows.cli", "bert.pretrain.stage", "bert.finetune"])
@pytest.mark.slow
def test_importing_the_parent_side_loads_neither_deepspeed_nor_the_rank_loop(module):
    """At run time too: the flow process and ``bertpipe pretrain`` never load DeepSpeed or the rank loop."""
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m in "
        f"{list(RANK_SIDE)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_rank_does_not_import_mlflow_through_deepspeed():
    """DeepSpeed's autotuner imports MLflow when it is installed; the ranks never need it (seconds of start-up)."""
    code = "import sys, bert.pretrain.rank; print('mlflow' in sys.modules); import mlflow"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"  # and importing it afterwards still works (check=True)
