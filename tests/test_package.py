"""The package's shape: a one-way import graph, modules of one job each (short), and the unstable TRL import
kept in one module. A change that breaks one of these says so here, not in a later review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "expertchat"
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def imports(path: Path) -> set[str]:
    """The ``expertchat`` modules ``path`` imports, at the top or inside functions (``TYPE_CHECKING`` blocks
    excluded: they never run)."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("expertchat"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {n.split(".")[1] for n in names if n.count(".") >= 1 and n.split(".")[1] in MODULES}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("expertchat.") and a.name.split(".")[1] in MODULES}
    return found - {path.stem}


def test_the_import_graph_has_no_cycle():
    graph = {name: imports(path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert "rewards" not in graph["judging"] and "judging" in graph["rewards"]  # the one-way seam of issue 9


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_short(name):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= 420, f"{name}.py has {len(text.splitlines())} lines: split it along a seam"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{name}.{node.name} has {length} lines"


def test_only_the_dpo_module_imports_trl():
    importers = {name for name, path in MODULES.items()
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Import | ast.ImportFrom)
                 and any((getattr(node, "module", None) or a.name).split(".")[0] == "trl"
                         for a in getattr(node, "names", []))}
    assert importers == {"dpo"}


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"__main__", "scoring"}))  # scoring's: tests/test_scoring.py
def test_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"expertchat.{name}"))
    assert result.failed == 0
