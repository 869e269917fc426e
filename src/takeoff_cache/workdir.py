"""The work folder: what a build machine keeps between builds and never flies."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CacheIOError


def default_work_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "takeoff-cache"


def resolve_work_dir(value: str | Path | None) -> Path:
    path = Path(value).expanduser().resolve() if value else default_work_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheIOError(f"work folder: cannot create {path}: {exc.strerror}") from exc
    return path
