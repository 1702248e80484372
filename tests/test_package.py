"""The package's shape: subpackages on floors that import only downwards, no import cycle of any kind (type-only
imports count: they are the first step of a runtime cycle), modules of one job each (short), classes and
functions short, the unstable TRL import kept in one module. A change that breaks one of these says so here."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "expertchat"
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}

# The rooms, bottom to top: a module imports only from its own room or the rooms below it (README, Layout).
FLOORS = [
    {"expertchat.errors", "expertchat.stats", "expertchat.interaction", "expertchat.audit"},  # leaves: errors;
    # statistics, text metrics; what the speakers did to each other; the judge audit's statistics
    {"expertchat.config"},  # the typed schema
    {"expertchat.runs"},  # run folders and inputs
    {"expertchat.engine"},  # models, KV caches, decoding
    {"expertchat.report"},  # console, tracker, report.md, plots, sweep table
    {"expertchat.policies"},  # adapters, views, merged copies
    {"expertchat.judging"},  # prompts, signals, the judge, rewards
    {"expertchat.stages"},  # topics, dialogue, rating, training, evaluation
    {"expertchat.modes"},  # run (the loop), rate, eval, plan, the registry
    {"expertchat.__main__", "expertchat"},  # the entrypoint; the package's __init__
]


def room(module: str) -> str:
    """``expertchat.stages.dialogue`` -> ``expertchat.stages``; top-level modules are rooms of their own."""
    parts = module.split(".")
    if parts[1:] == ["__init__"]:
        return "expertchat"
    return module if len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").exists() else ".".join(parts[:2])


def floor(module: str) -> int:
    r = room(module)
    found = [i for i, rooms in enumerate(FLOORS) if r in rooms]
    assert found, f"{module}: its room {r} is on no floor of tests/test_package.py (add it to FLOORS)"
    return found[0]


def imports(path: Path) -> set[str]:
    """The ``expertchat`` modules ``path`` imports: at the top, inside functions and in ``TYPE_CHECKING`` blocks."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "expertchat":
            for alias in node.names:  # `from expertchat.stages import dialogue` imports a module
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "expertchat"}
    own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return {m if m in MODULES else f"{m}.__init__" for m in found} - {own}


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH.get(name, ())):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in GRAPH:
        if name not in state:
            visit(name, [name])
    assert "expertchat.judging.rewards" not in GRAPH["expertchat.judging.judge"]  # the one-way seam of issue 9


def test_rooms_import_only_downwards():
    upward = [f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
              for m, deps in GRAPH.items() for d in deps if floor(d) > floor(m)]
    assert not upward, "an import runs up the floors: " + "; ".join(upward)


def test_every_subpackage_ships():
    """pyproject.toml lists the packages (conf/ is mapped in as expertchat.conf): a new room must be listed."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    rooms = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert listed == rooms | {"expertchat.conf"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_classes_and_functions_stay_short(name):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= 400, f"{name} has {len(text.splitlines())} lines: split it along a seam"
    for node in ast.walk(ast.parse(text)):
        length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert length <= 60, f"{name}.{node.name} has {length} lines"
        if isinstance(node, ast.ClassDef):
            assert length <= 250, f"class {name}.{node.name} has {length} lines"


def test_only_the_dpo_module_imports_trl():
    importers = {name for name, path in MODULES.items()
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Import | ast.ImportFrom)
                 and any((getattr(node, "module", None) or a.name).split(".")[0] == "trl"
                         for a in getattr(node, "names", []))}
    assert importers == {"expertchat.stages.dpo"}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")
                                        and m != "expertchat.judging.scoring"))  # its own: tests/judging/
def test_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name.removesuffix(".__init__")))
    assert result.failed == 0


# Test files above the rooms: the whole product (the CLI, kills and resumes, Slurm, the launcher scripts, this file,
# the gpu tier, the benchmarks' shared parts).
PRODUCT_TESTS = {"test_main", "test_crash", "test_slurm", "test_launchers", "test_package", "test_gpu",
                 "test_benchmarks"}


def test_test_files_mirror_the_modules():
    """``tests/<room>/test_<module>.py`` tests ``expertchat/<room>/<module>.py``; a test file with no module is an
    orphan left by a move."""
    orphans = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = path.relative_to(ROOT / "tests")
        module = PACKAGE.joinpath(*rel.parts[:-1], rel.name.removeprefix("test_"))
        if not module.exists() and not (len(rel.parts) == 1 and path.stem in PRODUCT_TESTS):
            orphans.append(str(rel))
    assert not orphans, f"test files without their module: {orphans}"


def test_no_test_file_imports_another():
    """Shared test helpers live in tests/conftest.py (or a helpers module), never in a test file."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tests" \
                    and node.module.split(".")[-1].startswith("test_"):
                found.append(f"{path.relative_to(ROOT)} imports {node.module}")
    assert not found, "; ".join(found)
