"""Imports point down the layer table of ARCHITECTURE.md, and no module imports itself back.

Every module of the package (subpackages included) has a row; a module imports only modules on
its own row or rows above it; and the import graph has no cycle at all (bench included), so two
modules on one row never lean on each other.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "asyncnn"

# Bottom to top, as in ARCHITECTURE.md. "x.*" stands for every module under package x.
LAYERS = [
    {"errors", "collector"},
    {"urgency"},
    {"tracing"},
    {"channels"},
    {"payload"},
    {"padding"},
    {"batching", "streams", "stepping", "pacing"},
    {"batcher"},
    {"batchrun"},
    {"devices"},
    {"executors", "executors_ray"},
    {"stage", "graph"},
    {"options", "partition"},
    {"runtime.probe", "runtime.ledger", "runtime.view", "runtime.wiring"},
    {"runtime.admission", "runtime.deadlines"},
    {"runtime.stepper"},
    {"runtime.joins", "runtime.context", "runtime.supervisor"},
    {"runtime.workers", "runtime.workers.*"},
    {"runtime.kinds"},
    {"runtime.runtime"},
    {"runtime"},
    {"stats"},
    {"loader.plan", "loader.reorder", "loader.config"},
    {"loader.flow", "loader.gather", "loader.choice", "loader.transport"},
    {"loader.processes", "loader.probe"},
    {"loader.batches"},
    {"loader.epoch"},
    {"loader"},
    {"events"},
    {"metrics", "streaming", "lifecycle"},
    {"entry"},
    {"pipeline"},
    {"bench", "bench.*"},
]


def rank(name: str) -> int:
    for i, row in enumerate(LAYERS):
        for pattern in row:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
                return i
    raise AssertionError(f"asyncnn/{name.replace('.', '/')}.py has no row in the layer table")


def modules() -> dict[str, Path]:
    """Dotted names under asyncnn (a package by its own name) -> file."""
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The asyncnn modules that module ``name`` imports (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
        target = [*base, *(node.module.split(".") if node.module else [])]
        for alias in node.names:  # `from . import metrics` imports a module
            sub = ".".join([*target, alias.name])
            if sub in known:
                deps.add(sub)
                break
        else:
            if target:
                deps.add(".".join(target))
    return {d for d in deps if d != name and d in known}


def test_every_module_has_a_row_and_imports_point_down():
    known = modules()
    for name, path in known.items():
        if name in ("__main__",):
            continue
        for dep in imports_of(name, path, known):
            if name.startswith(dep + ".") or dep.startswith(name + "."):
                continue  # a package and its own modules
            assert rank(dep) <= rank(name), f"{name} imports {dep}, which sits above it"


def test_no_import_cycle_anywhere():
    known = modules()
    graph = {n: imports_of(n, p, known) for n, p in known.items()}
    # A package's __init__ re-exports its modules: an edge into the package is not a cycle.
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                cycle = [*path[path.index(d) :], d] if d in path else [n, d]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d, [*path, d])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
