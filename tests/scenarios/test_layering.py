"""Imports point down: the package table of docs/design.md, kept by a test.

Every import in the library, on the Prefect side and in tasks/ and flows/ is
read from the source (function-level and type-checking imports included) and
resolved to the module it names. An import may stay inside its own package or
go to a package on a lower floor; one that points up, or sideways to another
package on the same floor, fails, and so does any cycle between modules.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A package may import its own modules and those of lower floors.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("takeoff_cache", "takeoff_cache.errors"),
    ("takeoff_cache.core",),
    ("takeoff_cache.trust", "takeoff_cache.tiles", "takeoff_cache.backbones"),
    ("takeoff_cache.engines",),
    ("takeoff_cache.descriptors", "takeoff_cache.features"),
    ("takeoff_cache.localize",),
    ("takeoff_cache.build",),
    ("takeoff_cache.companion",),
    ("takeoff_cache.prepare", "takeoff_cache.demo"),
    ("takeoff_cache_prefect", "takeoff_cache_prefect.tempapi"),
    ("takeoff_cache_prefect.tasks",),
    ("takeoff_cache_prefect.flows",),
    ("takeoff_cache_prefect.run",),
    ("takeoff_cache.cli",),
    ("takeoff_cache.__main__",),
)
FLOOR = {package: n for n, floor in enumerate(FLOORS) for package in floor}


def _sources() -> dict[str, Path]:
    """Module name -> file, for every module as it installs (pyproject's package-dir)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = config["package-dir"]
    modules: dict[str, Path] = {}
    for package in config["packages"]:
        folder = ROOT / dirs.get(package, Path(dirs[""], *package.split(".")))
        for path in sorted(Path(folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import of the project's own modules."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from package import module` depends on the module, not the package.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def package_of(module: str) -> str:
    """The row of FLOORS a module belongs to: its longest listed prefix."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOOR:
            return ".".join(parts[:n])
    raise KeyError(module)


def _graph() -> dict[str, dict[str, int]]:
    modules = _sources()
    return {name: dict(_imports(name, path, modules)) for name, path in modules.items()}


def layering_problems(graph: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        here = package_of(module)
        for target, line in sorted(targets.items()):
            there = package_of(target)
            if there == here or FLOOR[there] < FLOOR[here]:
                continue
            way = "up" if FLOOR[there] > FLOOR[here] else "sideways"
            problems.append(f"{module}:{line} imports {target} ({way}: {here} -> {there})")
    return problems


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_sits_on_a_floor() -> None:
    unplaced = []
    for module in _sources():
        try:
            package_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"add these to FLOORS (and docs/design.md): {unplaced}"


def test_imports_point_down_only() -> None:
    problems = layering_problems(_graph())
    assert not problems, "imports against the package table:\n" + "\n".join(problems)


def test_no_import_cycles() -> None:
    found = cycles(_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_check_fails_on_an_upward_import_and_a_cycle() -> None:
    graph = _graph()
    graph["takeoff_cache.core.tilemath"] = {"takeoff_cache.build.request": 1}
    graph["takeoff_cache.build.request"] = {
        **graph["takeoff_cache.build.request"],
        "takeoff_cache.core.tilemath": 2,
    }
    assert layering_problems(graph) == [
        "takeoff_cache.core.tilemath:1 imports takeoff_cache.build.request"
        " (up: takeoff_cache.core -> takeoff_cache.build)"
    ]
    pair = {"takeoff_cache.build.request", "takeoff_cache.core.tilemath"}
    assert any(pair <= set(group) for group in cycles(graph))
    graph = _graph()
    graph["takeoff_cache.tiles.corpus"] = {"takeoff_cache.trust.keys": 3}
    assert layering_problems(graph) == [
        "takeoff_cache.tiles.corpus:3 imports takeoff_cache.trust.keys"
        " (sideways: takeoff_cache.tiles -> takeoff_cache.trust)"
    ]


@pytest.mark.parametrize("library", ["takeoff_cache"])
def test_the_library_never_names_the_prefect_side(library: str) -> None:
    graph = _graph()
    allowed = {"takeoff_cache.cli"}
    offenders = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith(f"{library}.") and package_of(m) not in allowed
        for t in targets
        if t.startswith("takeoff_cache_prefect")
    ]
    assert not offenders, offenders
