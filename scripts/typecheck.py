"""Type-check the project as it installs: tasks/ and flows/ under takeoff_cache_prefect.

The packaging maps the repository's tasks/ and flows/ folders to
takeoff_cache_prefect.tasks and .flows (pyproject's package-dir). mypy resolves
imports by folder only, so the Prefect side is laid out here the way it
installs, in .typecheck/ (copies, refreshed on every run), and every path mypy
prints is given back as the file in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".typecheck"


def _layout() -> dict[str, Path]:
    """Installed package name -> the checkout's folder, from pyproject's package-dir."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    src = ROOT / config["package-dir"][""]
    mapped = {k: ROOT / v for k, v in config["package-dir"].items() if k}
    layout = {}
    for name in config["packages"]:
        if name.split(".")[0] != "takeoff_cache_prefect":
            continue
        layout[name] = mapped.get(name, src.joinpath(*name.split(".")))
    return layout


def _mirror(layout: dict[str, Path]) -> dict[str, str]:
    """Copy each package's modules into TREE; return copy path -> checkout path."""
    back: dict[str, str] = {}
    wanted: set[Path] = set()
    for name, folder in layout.items():
        dest = TREE.joinpath(*name.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.glob("*.py")) + sorted(folder.glob("py.typed")):
            copy = dest / source.name
            wanted.add(copy)
            if not copy.exists() or copy.read_bytes() != source.read_bytes():
                shutil.copyfile(source, copy)
            back[str(copy.relative_to(ROOT))] = str(source.relative_to(ROOT))
    for stale in TREE.rglob("*.py"):
        if stale not in wanted:
            stale.unlink()
    return back


def main() -> int:
    back = _mirror(_layout())
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "src/takeoff_cache",
        str((TREE / "takeoff_cache_prefect").relative_to(ROOT)),
    ]
    env_path = f"{TREE.relative_to(ROOT)}:src"
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MYPYPATH": env_path}
    )
    text = out.stdout + out.stderr
    for copy, source in sorted(back.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(copy, source)
    sys.stdout.write(text)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
