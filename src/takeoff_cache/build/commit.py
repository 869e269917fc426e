"""The commit phase: switch manifests atomically, then delete what only the old one listed.

Order of operations, each step durable (fsync) before the next:

1. the signed new manifest is written to ``.staging/Manifest.pending.json``;
   only then are the artifacts copied from the work folder into ``.staging/``,
   so that nothing is ever in staging that a signed manifest there does not
   list with its digest (an interrupted copy excepted, see trust/cachefiles.py);
2. the artifacts move from ``.staging/`` to their final paths;
3. the current manifest is kept as ``.staging/Manifest.previous.json``;
4. ``Manifest.json`` is replaced by the pending one in one ``rename`` — the commit point;
5. files only the previous manifest listed are deleted; 6. staging is removed.

Between 2 and 4 the cache holds files the old manifest does not list, and
between 4 and 6 files the new one does not list; both are listed, with their
digests, in a signed manifest kept in staging, which is what lets
``verify`` accept them (see trust/cachefiles.py). A build killed anywhere leaves a
cache that verifies; :func:`recover` rolls the leftovers back (before the
commit point) or forward (after it) under the next build's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from takeoff_cache.core.faults import checkpoint
from takeoff_cache.core.fsutil import atomic_write_bytes, copy_file, fsync_dir
from takeoff_cache.core.layout import (
    MANIFEST_NAME,
    PENDING_MANIFEST,
    RETIRED_MANIFEST,
    STAGING_NAME,
)
from takeoff_cache.errors import CacheIOError, VerificationError
from takeoff_cache.trust.keys import TrustedKey
from takeoff_cache.trust.manifest import Manifest, verify_manifest_bytes


def staging_dir(cache_root: Path) -> Path:
    return cache_root / STAGING_NAME


def _listed_paths(data: bytes) -> set[str]:
    try:
        doc = json.loads(data)
        return {a["path"] for a in doc["signed"]["artifacts"] if isinstance(a.get("path"), str)}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return set()


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Name the step in the one line an operator sees when the disk fails under it."""
    try:
        yield
    except CacheIOError:
        raise
    except OSError as exc:
        raise CacheIOError(f"commit: cannot {what}: {exc.strerror or exc}") from exc


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
            # Only a manifest we signed may name files for deletion, expired or not.
            verify_manifest_bytes(data, list(trusted), check_expiry=False)
        except (OSError, VerificationError):
            continue
        for rel in sorted(_listed_paths(data) - current):
            checkpoint("recover.remove", cache_root / rel)
            _remove_file(cache_root, rel)
    checkpoint("recover.cleanup", staging)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(cache_root)
    return True


def prepare_staging(cache_root: Path) -> Path:
    folder = staging_dir(cache_root)
    shutil.rmtree(folder, ignore_errors=True)
    with _step(f"create {folder}"):
        checkpoint("commit.staging", folder)
        folder.mkdir()
    return folder


@contextmanager
def staging(cache_root: Path, trusted: tuple[TrustedKey, ...]) -> Iterator[Path]:
    """A fresh staging folder for one build; settled on the way out, however it ends.

    Before the commit point there is nothing in it that the cache refers to, and
    it goes; past it, :func:`recover` finishes what :func:`commit` left. If the
    disk still fails, staging stays and ``verify`` still accepts the cache (its
    signed manifests vouch for the files); the next build's lock phase settles it.
    """
    folder = prepare_staging(cache_root)
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            recover(cache_root, trusted)


def commit(
    cache_root: Path,
    manifest_bytes: bytes,
    staged: list[tuple[str, str]],
    previous: Manifest | None,
    new_paths: set[str],
) -> list[str]:
    """Make the new build the cache; return the paths only the old manifest had (deleted).

    ``staged``: (path in the cache, file to copy there) for every artifact.
    """
    staging = staging_dir(cache_root)
    pending = staging / PENDING_MANIFEST
    with _step(f"write {pending}"):
        atomic_write_bytes(pending, manifest_bytes, point="commit.pending")
    # Every cache gets its own copy (a copy-on-write clone where the file system
    # offers one): a file damaged in one cache never damages another cache built
    # from the same work folder, nor the store, nor the operator's calibration file.
    for rel, source in staged:
        with _step(f"copy {source} to {staging / rel}"):
            copy_file(Path(source), staging / rel)
    touched: set[Path] = set()
    # Artifact names carry their content key, so a staged file that lands on an
    # existing path replaces it with the same bytes: the old manifest stays true.
    # A symlink or special file squatting on a listed path is replaced, not followed.
    for rel, _ in staged:
        dst = cache_root / rel
        with _step(f"move {staging / rel} to {dst}"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            checkpoint("commit.move", dst)
            os.replace(staging / rel, dst)
        touched.add(dst.parent)
    with _step(f"sync {cache_root}"):
        for folder in sorted(touched):
            fsync_dir(folder)
    current = cache_root / MANIFEST_NAME
    retired = staging / RETIRED_MANIFEST
    with _step(f"keep the previous manifest as {retired}"):
        checkpoint("commit.retire", retired)
        if current.exists():
            try:
                os.link(current, retired)
            except OSError:
                atomic_write_bytes(retired, current.read_bytes())
            fsync_dir(staging)
    with _step(f"rename {pending} to {current}"):
        checkpoint("commit.switch", current)
        os.replace(pending, current)
        fsync_dir(cache_root)
    # Past the commit point: the new manifest is in force. A failure below leaves
    # old files that the retired manifest still vouches for until recover() runs.
    old_paths = {a.path for a in previous.artifacts} if previous else set()
    removed = sorted(old_paths - new_paths)
    for rel in removed:
        with _step(f"delete {cache_root / rel}"):
            checkpoint("commit.delete", cache_root / rel)
            _remove_file(cache_root, rel)
    with _step(f"remove {staging}"):
        checkpoint("commit.cleanup", staging)
        shutil.rmtree(staging, ignore_errors=True)
        checkpoint("commit.done", cache_root)
        fsync_dir(cache_root)
    return removed
