"""Imports point down the layer table of DESIGN.md (a module imports only modules above it)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "asyncnn"

# Bottom to top, as in DESIGN.md; modules on one line share a row. pipeline and bench sit on top.
LAYERS = [
    {"errors"},
    {"channels"},
    {"batching"},
    {"devices"},
    {"executors", "executors_ray"},
    {"stage", "graph"},
    {"scheduler"},
    {"loader"},
    {"events", "metrics"},
    {"pipeline"},
    {"bench"},
]
RANK = {name: i for i, row in enumerate(LAYERS) for name in row}


def imports_of(path: Path, level: int = 1) -> set[str]:
    """The asyncnn modules that ``path`` imports (relative imports ``level`` dots up)."""
    tree = ast.parse(path.read_text())
    return {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == level and node.module
    }


def test_every_module_has_a_row_and_imports_point_down():
    for path in sorted(PKG.glob("*.py")):
        name = path.stem
        if name == "__init__":
            continue
        assert name in RANK, f"{name}.py has no row in the DESIGN layer table"
        for dep in imports_of(path):
            if dep == "pipeline" and name == "metrics":
                continue  # a type-only import (under TYPE_CHECKING) for the collector's argument
            assert RANK[dep] <= RANK[name], f"{name} imports {dep}, which sits above it"
    for path in sorted((PKG / "bench").glob("*.py")):
        for dep in imports_of(path, level=2):
            assert dep in RANK, f"bench/{path.name} imports unknown {dep}"
