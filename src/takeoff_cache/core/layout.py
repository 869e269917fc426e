"""Names inside a cache root, and the walk that finds every entry in it.

``cache_root`` holds exactly what flies: ``Manifest.json`` and the artifacts it
lists. The lock file and the build's staging folder are the only other
entries a build may leave, and both are outside the cache proper.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "Manifest.json"
LOCK_NAME = ".build.lock"
STAGING_NAME = ".staging"
# Inside staging: the signed manifest about to take over, and the one it
# replaced, kept until the old files are gone (see build/commit.py).
PENDING_MANIFEST = "Manifest.pending.json"
RETIRED_MANIFEST = "Manifest.previous.json"
RESERVED = frozenset({MANIFEST_NAME, LOCK_NAME, STAGING_NAME})


@dataclass(frozen=True)
class CacheEntries:
    files: tuple[str, ...]  # regular files, relative POSIX paths
    others: tuple[str, ...]  # symlinks, devices, sockets… (never allowed)


def walk_cache(root: Path) -> CacheEntries:
    """List every entry under ``root`` except the reserved top-level names."""
    files: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in RESERVED]
            filenames = [f for f in filenames if f not in RESERVED]
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                others.append((rel_dir / d).as_posix())
                dirnames.remove(d)
        for name in filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            rel = (rel_dir / name).as_posix()
            (files if stat.S_ISREG(mode) else others).append(rel)
    return CacheEntries(tuple(sorted(files)), tuple(sorted(others)))
