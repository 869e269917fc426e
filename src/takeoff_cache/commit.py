"""The commit phase: switch manifests atomically, then delete what only the old one listed.

Order of operations, each step durable (fsync) before the next:

1. the signed new manifest is written to ``.staging/Manifest.pending.json``;
2. new artifacts move from ``.staging/`` to their final paths;
3. the current manifest is kept as ``.staging/Manifest.previous.json``;
4. ``Manifest.json`` is replaced by the pending one in one ``rename`` — the commit point;
5. files only the previous manifest listed are deleted; 6. staging is removed.

Between 2 and 4 the cache holds files the old manifest does not list, and
between 4 and 6 files the new one does not list; both are listed, with their
digests, in a signed manifest kept in staging, which is what lets
``verify`` accept them (see verify.py). A build killed anywhere leaves a
cache that verifies; :func:`recover` rolls the leftovers back (before the
commit point) or forward (after it) under the next build's lock.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import VerificationError
from .fsutil import atomic_write_bytes, fsync_dir
from .keys import TrustedKey
from .layout import MANIFEST_NAME, PENDING_MANIFEST, RETIRED_MANIFEST, STAGING_NAME
from .manifest import Manifest, verify_manifest_bytes


def staging_dir(cache_root: Path) -> Path:
    return cache_root / STAGING_NAME


def _listed_paths(data: bytes) -> set[str]:
    try:
        doc = json.loads(data)
        return {a["path"] for a in doc["signed"]["artifacts"] if isinstance(a.get("path"), str)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return set()


def _remove_file(cache_root: Path, rel: str) -> None:
    path = cache_root / rel
    if path.is_symlink() or path.is_file():
        path.unlink()
        parent = path.parent
        # Drop folders the deletion emptied, never the cache root itself.
        while parent != cache_root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def recover(cache_root: Path, trusted: tuple[TrustedKey, ...]) -> bool:
    """Undo or finish what a killed build left in staging; return True if there was anything."""
    staging = staging_dir(cache_root)
    if not staging.exists():
        return False
    try:
        current = _listed_paths((cache_root / MANIFEST_NAME).read_bytes())
    except FileNotFoundError:
        current = set()
    for name in (PENDING_MANIFEST, RETIRED_MANIFEST):
        try:
            data = (staging / name).read_bytes()
            # Only a manifest we signed may name files for deletion.
            verify_manifest_bytes(data, list(trusted))
        except (OSError, VerificationError):
            continue
        for rel in sorted(_listed_paths(data) - current):
            _remove_file(cache_root, rel)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(cache_root)
    return True


def prepare_staging(cache_root: Path) -> Path:
    staging = staging_dir(cache_root)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def discard_staging(cache_root: Path) -> None:
    """Drop an uncommitted build's staging folder (nothing in it is referenced yet)."""
    shutil.rmtree(staging_dir(cache_root), ignore_errors=True)


def commit(
    cache_root: Path,
    manifest_bytes: bytes,
    staged: list[str],
    previous: Manifest | None,
    new_paths: set[str],
) -> list[str]:
    """Make the staged build the cache; return the paths only the old manifest had (deleted)."""
    staging = staging_dir(cache_root)
    atomic_write_bytes(staging / PENDING_MANIFEST, manifest_bytes)
    touched: set[Path] = set()
    # Artifact names carry their content key, so a staged file that lands on an
    # existing path replaces it with the same bytes: the old manifest stays true.
    for rel in staged:
        dst = cache_root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
        touched.add(dst.parent)
    for folder in sorted(touched):
        fsync_dir(folder)
    current = cache_root / MANIFEST_NAME
    retired = staging / RETIRED_MANIFEST
    if current.exists():
        try:
            os.link(current, retired)
        except OSError:
            atomic_write_bytes(retired, current.read_bytes())
        fsync_dir(staging)
    os.replace(staging / PENDING_MANIFEST, current)
    fsync_dir(cache_root)
    old_paths = {a.path for a in previous.artifacts} if previous else set()
    removed = sorted(old_paths - new_paths)
    for rel in removed:
        _remove_file(cache_root, rel)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(cache_root)
    return removed
