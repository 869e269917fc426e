"""Facts defined once stay defined once: each test reads every module of the
library, the Prefect side, tasks/ and flows/ and fails where a second
definition of a fact appears outside the module that owns it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("src", "tasks", "flows")


def _modules() -> Iterator[tuple[str, ast.Module]]:
    """(path relative to the repository, parsed module) for every module checked."""
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the module's, classes' and functions' docstring nodes."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of every string constant that is not a docstring, f-strings' parts included."""
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in skip:
            if isinstance(node.value, str):
                yield node.lineno, node.value
            elif isinstance(node.value, bytes):
                yield node.lineno, node.value.decode("latin-1")


def test_environment_variables_are_named_only_in_core_env() -> None:
    owner = "src/takeoff_cache/core/env.py"
    found = [
        f"{path}:{line}: {text!r}"
        for path, tree in _modules()
        if path != owner
        for line, text in _strings(tree)
        if "TAKEOFF_CACHE_" in text
    ]
    assert not found, f"import the variable's name from {owner} instead:\n" + "\n".join(found)
