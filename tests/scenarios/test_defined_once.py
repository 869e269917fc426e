"""Facts defined once stay defined once: each test reads every module of the
library, the Prefect side, tasks/ and flows/ and fails where a second
definition of a fact appears outside the module that owns it.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

from takeoff_cache.core import workdir

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


def _work_folder_names() -> set[str]:
    """The work folder's entries, as core/workdir.py lays them out: what each of
    its functions of a work folder alone returns."""
    names = set()
    for fn in vars(workdir).values():
        if (
            inspect.isfunction(fn)
            and fn.__module__ == workdir.__name__
            and list(inspect.signature(fn).parameters) == ["work"]
        ):
            names.add(fn(Path("WORK")).relative_to("WORK").parts[0])
    return names


_WORK = re.compile(r"\bwork(_dir|dir|_folder)?\b")


def _names_work_folder(node: ast.expr) -> bool:
    """Whether an expression is a work folder itself (``work``, ``options.work_dir``,
    ``Path(params["work_dir"])``), not something a function derived from one."""
    if isinstance(node, ast.Call):
        func = ast.unparse(node.func)
        return func in ("Path", "pathlib.Path") and any(_names_work_folder(a) for a in node.args)
    return bool(_WORK.search(ast.unparse(node)))


def _literal_joins(tree: ast.Module) -> Iterator[tuple[int, str, str]]:
    """(line, folder expression, name) for every literal name joined onto a path:
    ``a / "x"``, ``a.joinpath("x")``, ``os.path.join(a, "x")``, ``f"{a}/x"``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if isinstance(node.right, ast.Constant) and isinstance(node.right.value, str):
                yield node.lineno, ast.unparse(node.left), node.right.value
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.endswith(".joinpath") and isinstance(node.func, ast.Attribute):
                base, args = node.func.value, node.args
            elif func in ("os.path.join", "join") and node.args:
                base, args = node.args[0], node.args[1:]
            else:
                continue
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, ast.unparse(base), arg.value
        elif isinstance(node, ast.JoinedStr):
            for before, after in zip(node.values, node.values[1:], strict=False):
                if (
                    isinstance(before, ast.FormattedValue)
                    and isinstance(after, ast.Constant)
                    and isinstance(after.value, str)
                    and after.value.startswith("/")
                ):
                    yield node.lineno, ast.unparse(before.value), after.value[1:]


def test_the_work_folder_layout_is_only_in_core_workdir() -> None:
    owner = "src/takeoff_cache/core/workdir.py"
    layout = _work_folder_names()
    assert {"tiles", "areas", "engines", "indexes"} <= layout
    found = []
    for path, tree in _modules():
        if path == owner:
            continue
        for line, folder, name in _literal_joins(tree):
            first = name.strip("/").split("/")[0]
            # Any literal joined onto a work folder is layout; a layout name is, onto anything.
            if first in layout or _names_work_folder(ast.parse(folder, mode="eval").body):
                found.append(f"{path}:{line}: {folder} / {name!r}")
    assert not found, f"ask {owner} for the folder instead:\n" + "\n".join(found)


# The commit protocol's own renames: they move files that are already whole and
# fsynced in staging (written through atomic_output, atomic_write_bytes or
# copy_file) into the cache, then switch the manifest, each step with its own
# fault point and the folders synced once after the moves. They are the
# protocol, not a write through a temporary name. (module, function): renames.
_PROTOCOL_RENAMES = {("src/takeoff_cache/build/commit.py", "commit"): 2}
_RENAMES = frozenset({"os.replace", "os.rename", "os.renames", "shutil.move"})


def _renames(tree: ast.Module) -> Iterator[tuple[int, str, str]]:
    """(line, enclosing function, call) for every rename: ``os.replace`` and its kin,
    and ``Path.replace``/``Path.rename`` (a ``.replace`` or ``.rename`` of one
    positional argument: ``str.replace`` takes two, ``datetime.replace`` keywords)."""

    def visit(node: ast.AST, function: str) -> Iterator[tuple[int, str, str]]:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            one_path = len(node.args) == 1 and not node.keywords
            if func in _RENAMES or (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in ("replace", "rename")
                and one_path
            ):
                yield node.lineno, function, func
        for child in ast.iter_child_nodes(node):
            yield from visit(child, function)

    yield from visit(tree, "<module>")


def test_writes_through_a_temporary_name_go_through_core_fsutil() -> None:
    owner = "src/takeoff_cache/core/fsutil.py"
    found, protocol = [], dict.fromkeys(_PROTOCOL_RENAMES, 0)
    for path, tree in _modules():
        if path == owner:
            continue
        for line, function, call in _renames(tree):
            if (path, function) in protocol:
                protocol[path, function] += 1
            else:
                found.append(f"{path}:{line}: {call}() in {function}")
    assert not found, f"write through {owner}'s atomic_output instead:\n" + "\n".join(found)
    assert protocol == _PROTOCOL_RENAMES, "the commit protocol's renames changed: review them"


_CREATE = re.compile(
    r"\bCREATE\s+(?:UNIQUE\s+)?(TABLE|INDEX|VIEW|TRIGGER)\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?!IF\s+NOT\b)[\"`\[]?(\w*)"
    r"(?:\s+ON\s+[\"`\[]?(\w+))?",
    re.IGNORECASE,
)
# MBTiles' own objects: the tables, and whatever is made on the tiles table.
_MBTILES = frozenset({"tiles", "metadata", "tile_index"})
# Tables of other SQLite files, which have nothing to do with MBTiles: (module, table).
_OTHER_TABLES = frozenset(
    {
        ("src/takeoff_cache/descriptors/store.py", "spaces"),
        ("src/takeoff_cache/descriptors/store.py", "vectors"),
        ("src/takeoff_cache/features/store.py", "features"),
        ("src/takeoff_cache/features/store.py", "spaces"),
    }
)


def _created(tree: ast.Module) -> Iterator[tuple[int, str, str | None]]:
    """(line, object, table it is on) for every CREATE in a string constant."""
    for line, text in _strings(tree):
        for match in _CREATE.finditer(text):
            yield line, match[2].lower() or "<formatted>", (match[3] or "").lower() or None


def test_the_mbtiles_schema_is_only_in_tiles_mbtiles() -> None:
    owner = "src/takeoff_cache/tiles/mbtiles.py"
    found, owned = [], []
    for path, tree in _modules():
        for line, name, table in _created(tree):
            if path == owner:
                owned += [name] if name in _MBTILES else []
            elif name in _MBTILES or table in _MBTILES or (path, name) not in _OTHER_TABLES:
                found.append(f"{path}:{line}: CREATE {name}" + (f" ON {table}" if table else ""))
    assert not found, f"create MBTiles tables with {owner}'s create_schema:\n" + "\n".join(found)
    assert sorted(owned) == sorted(_MBTILES), f"{owner} creates each MBTiles object once: {owned}"
