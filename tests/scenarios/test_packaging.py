"""What installing the project puts on the import path: its own names only."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _dist() -> importlib.metadata.Distribution:
    # As installed in site-packages: a build's egg-info in the checkout says
    # what an older layout had, not what the installation holds.
    site = sysconfig.get_paths()["purelib"]
    (dist,) = (
        d
        for d in importlib.metadata.distributions(path=[site])
        if d.metadata["Name"] == "takeoff-cache"
    )
    return dist


def _top_level_names() -> set[str]:
    text = _dist().read_text("top_level.txt") or ""
    return {line.strip() for line in text.splitlines() if line.strip()}


def _importable_from_pth() -> set[str]:
    """Top-level modules reachable through the folders the distribution's .pth files add."""
    names: set[str] = set()
    for entry in _dist().files or []:
        if not str(entry).endswith(".pth"):
            continue
        for line in Path(str(entry.locate())).read_text().splitlines():
            folder = Path(line.strip())
            if line.startswith(("import ", "#")) or not folder.is_dir():
                continue
            for child in folder.iterdir():
                if (child / "__init__.py").is_file() or child.suffix == ".py":
                    names.add(child.stem)
    return names


def test_installed_top_level_names_are_the_projects_own() -> None:
    names = _top_level_names() | _importable_from_pth()
    assert names, "the distribution lists no top-level names"
    generic = sorted(n for n in names if not n.startswith("takeoff_cache"))
    assert not generic, f"installing takeoff-cache adds generic top-level names: {generic}"
    assert {"takeoff_cache", "takeoff_cache_prefect"} <= names
    for name in names:
        importlib.import_module(name)


def test_flows_and_tasks_install_under_the_projects_namespace() -> None:
    # A fresh interpreter outside the repository, so the checkout's own folders
    # are not on the path: only what was installed answers.
    code = (
        "import importlib.util as u, sys;"
        "import takeoff_cache_prefect.flows.build, takeoff_cache_prefect.tasks.build;"
        "print(u.find_spec('tasks') is None and u.find_spec('flows') is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"


def test_importing_the_library_never_imports_prefect() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT / "src").with_suffix("").parts)
        for p in (ROOT / "src" / "takeoff_cache").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name != "demo"
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        if 'tensorrt' not in str(exc) and 'cuda' not in str(exc): raise\n"
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def _setuptools() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]


def test_prefect_side_names_are_the_folders_prefect_deploy_reads() -> None:
    # Mapped by the packaging, not linked: nothing under src/ points elsewhere.
    dirs = _setuptools()["package-dir"]
    assert dirs["takeoff_cache_prefect.tasks"] == "tasks"
    assert dirs["takeoff_cache_prefect.flows"] == "flows"
    links = [str(p) for p in (ROOT / "src").rglob("*") if p.is_symlink()]
    assert not links, links
    module = importlib.import_module("takeoff_cache_prefect.flows.build")
    assert Path(str(module.__file__)).resolve() == (ROOT / "flows" / "build.py").resolve()


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    # An unlisted package would import here (the checkout is on the path) and be
    # missing from the wheel an operator installs.
    listed = set(_setuptools()["packages"])
    # Every folder that holds a module or data: an unlisted data folder is left
    # out of the wheel too (and setuptools warns of it at every install).
    found = {
        ".".join(p.parent.relative_to(ROOT / "src").parts)
        for p in (ROOT / "src").rglob("*")
        if p.is_file()
        and p.parent != ROOT / "src"
        and "__pycache__" not in p.parts
        and not any(part.endswith(".egg-info") for part in p.parts)
    } | {"takeoff_cache_prefect.tasks", "takeoff_cache_prefect.flows"}
    assert listed == found, f"unlisted: {sorted(found - listed)}; gone: {sorted(listed - found)}"
