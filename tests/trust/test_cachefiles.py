"""The one reader of a cache's files: Manifest.json read safely, and no second copy of
the checks anywhere else (a second copy drifts: the no-op check's did)."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.cachefiles import read_manifest

ROOT = Path(__file__).resolve().parents[2]
OWNER = "src/takeoff_cache/trust/cachefiles.py"


def test_the_manifest_is_read_as_it_is(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(b"{}")
    assert read_manifest(tmp_path) == b"{}"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: None, "is missing from"),
        (lambda p: p.mkdir(), "is a folder, not a file"),
        (lambda p: p.symlink_to(p.parent / "elsewhere.json"), "is a symlink"),
        (lambda p: os.mkfifo(p), "is not a regular file"),
    ],
    ids=["missing", "folder", "symlink", "fifo"],
)
def test_a_manifest_that_is_not_a_regular_file_is_refused_unopened(
    tmp_path: Path, make: Callable[[Path], object], words: str
) -> None:
    (tmp_path / "elsewhere.json").write_bytes(b"{}")
    make(tmp_path / MANIFEST_NAME)
    with pytest.raises(VerificationError, match=words):
        read_manifest(tmp_path)


def _functions() -> Iterator[tuple[str, ast.AST]]:
    """(path:function, node) for every function of the library, tasks/ and flows/."""
    for top in ("src", "tasks", "flows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{rel}:{node.name}", node


def _called(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            func = sub.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def _names(node: ast.AST) -> set[str]:
    return {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}


def _compares_a_digest_with_an_artifacts(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Compare):
            sides = [sub.left, *sub.comparators]
            hashed = any(isinstance(s, ast.Call) and "sha256_file" in _called(s) for s in sides)
            recorded = any(isinstance(s, ast.Attribute) and s.attr == "sha256" for s in sides)
            if hashed and recorded:
                return True
    return False


def test_only_the_reader_checks_a_caches_files() -> None:
    found = []
    for where, node in _functions():
        if where.startswith(OWNER + ":"):
            continue
        kind_checks = _called(node) & {"lstat", "is_symlink", "S_ISREG", "S_ISLNK"}
        if "MANIFEST_NAME" in _names(node) and kind_checks:
            found.append(f"{where}: checks what {MANIFEST_NAME} is; use read_manifest")
        if _compares_a_digest_with_an_artifacts(node):
            found.append(f"{where}: checks an artifact's SHA-256; use file_problems")
        # The build's coverage phase walks the cache for the manifest it is about to commit.
        if "walk_cache" in _called(node) and not where.startswith(
            "src/takeoff_cache/build/coverage.py:"
        ):
            found.append(f"{where}: walks a cache; use file_problems")
    assert not found, f"read a cache through {OWNER}:\n" + "\n".join(found)
