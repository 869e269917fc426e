"""``takeoff-cache verify``: prove a cache is complete, unmodified, trusted and meant for this host.

The signature, format, expiry and version checks are the pure function
:func:`manifest.verify_manifest_bytes`; this module reads the files around it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CacheIOError, VerificationError
from .fsutil import atomic_write_bytes, sha256_file
from .keys import TrustedKey
from .layout import (
    LOCK_NAME,
    MANIFEST_NAME,
    PENDING_MANIFEST,
    RETIRED_MANIFEST,
    STAGING_NAME,
    walk_cache,
)
from .manifest import Artifact, Manifest, verify_manifest_bytes


def _read_state(state_file: Path | None, cache_id: str) -> int | None:
    if state_file is None or not state_file.exists():
        return None
    try:
        state = json.loads(state_file.read_text())
        seen = state["caches"][cache_id]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return seen if isinstance(seen, int) else None


def _write_state(state_file: Path, cache_id: str, version: int) -> None:
    state: dict[str, Any] = {"caches": {}}
    if state_file.exists():
        try:
            loaded = json.loads(state_file.read_text())
            if isinstance(loaded, dict) and isinstance(loaded.get("caches"), dict):
                state = loaded
        except (OSError, ValueError):
            pass
    state["caches"][cache_id] = {"version": version}
    try:
        atomic_write_bytes(state_file, json.dumps(state, indent=2, sort_keys=True).encode())
    except OSError as exc:
        raise CacheIOError(f"state: cannot write {state_file}: {exc.strerror}") from exc


def _check_artifact(root: Path, artifact: Artifact) -> str | None:
    try:
        return _artifact_problem(root, artifact)
    except (OSError, ValueError) as exc:
        # A signed path the OS cannot even look up (too long, a NUL byte), or an unreadable file.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"{artifact.path[:200]!r}: cannot be checked: {reason}"


def _artifact_problem(root: Path, artifact: Artifact) -> str | None:
    rel = PurePosixPath(artifact.path)
    # Every component must be a real folder, not a symlink that leads elsewhere.
    current = root
    for part in rel.parts[:-1]:
        current = current / part
        try:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return f"{artifact.path}: {current.relative_to(root)} is not a folder"
        except FileNotFoundError:
            return f"{artifact.path}: missing"
    path = root / artifact.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{artifact.path}: missing"
    if stat.S_ISLNK(st.st_mode):
        return f"{artifact.path}: is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return f"{artifact.path}: not a regular file"
    if st.st_size != artifact.size:
        return f"{artifact.path}: size {st.st_size} != recorded {artifact.size}"
    if sha256_file(path) != artifact.sha256:
        return f"{artifact.path}: SHA-256 differs from the manifest"
    return None


def _vouched_in_staging(root: Path, trusted: list[TrustedKey], version: int) -> dict[str, Artifact]:
    """Artifacts of the signed manifest next to, or just before, the current one.

    Only the one version a commit in progress can leave behind counts: the
    pending manifest is the current version + 1, the retired one the current
    version - 1. An older signed manifest dropped into staging vouches for nothing.
    """
    vouched: dict[str, Artifact] = {}
    for name, expected in ((PENDING_MANIFEST, version + 1), (RETIRED_MANIFEST, version - 1)):
        path = root / STAGING_NAME / name
        try:
            other = verify_manifest_bytes(path.read_bytes(), trusted, check_expiry=False)
        except (OSError, VerificationError):
            continue
        if other.version == expected:
            vouched.update({a.path: a for a in other.artifacts})
    return vouched


def _reserved_problems(root: Path) -> list[str]:
    """The lock file and staging folder are never read by the vehicle, but they may
    not hide a symlink or a special file either."""
    problems = []
    lock = root / LOCK_NAME
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):
        problems.append(f"{LOCK_NAME}: not a regular file")
    staging = root / STAGING_NAME
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        problems.append(f"{STAGING_NAME}: not a folder")
    elif staging.is_dir():
        for dirpath, dirnames, filenames in os.walk(staging):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                mode = os.lstat(full).st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    problems.append(f"{full.relative_to(root).as_posix()}: not a regular file")
    return problems


def engine_host_problem(manifest: Manifest, host: dict[str, Any]) -> str | None:
    built_for = manifest.signed.get("host")
    if built_for != host:
        return (
            f"engines were built for another host ({json.dumps(built_for, sort_keys=True)});"
            f" this host is {json.dumps(host, sort_keys=True)}"
        )
    return None


def verify_cache(
    cache_root: Path,
    trusted: list[TrustedKey],
    *,
    state_file: Path | None = None,
    host: dict[str, Any] | None = None,
) -> Manifest:
    """Return the verified manifest, or raise :class:`VerificationError` with every problem.

    ``host``: when given (``--host-check``), the identity the engines must have been built for.
    """
    root = cache_root.resolve()
    cache_id = str(root)
    if not root.is_dir():
        raise VerificationError(f"{cache_root} is not a folder")
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_symlink():
        raise VerificationError(f"{MANIFEST_NAME} is a symlink; it must be a regular file")
    try:
        # Checked before opening: a FIFO would block the open, a device read forever.
        mode = os.lstat(manifest_path).st_mode
        if stat.S_ISDIR(mode):
            raise VerificationError(f"{MANIFEST_NAME} is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise VerificationError(f"{MANIFEST_NAME} is not a regular file")
        data = manifest_path.read_bytes()
    except FileNotFoundError:
        raise VerificationError(f"{MANIFEST_NAME} is missing from {cache_root}") from None
    except OSError as exc:
        raise VerificationError(f"{MANIFEST_NAME} cannot be read: {exc.strerror}") from None
    manifest = verify_manifest_bytes(data, trusted, min_version=_read_state(state_file, cache_id))

    problems = [p for a in manifest.artifacts if (p := _check_artifact(root, a))]
    listed = {a.path for a in manifest.artifacts}
    entries = walk_cache(root)
    unlisted = [p for p in entries.files if p not in listed]
    if unlisted:
        vouched = _vouched_in_staging(root, trusted, manifest.version)
        for rel in unlisted:
            other = vouched.get(rel)
            if other is None or _check_artifact(root, other) is not None:
                problems.append(f"{rel}: not listed in the manifest")
    problems += [f"{rel}: not a regular file (symlink or special file)" for rel in entries.others]
    problems += _reserved_problems(root)
    if host is not None and (problem := engine_host_problem(manifest, host)):
        problems.append(problem)
    if problems:
        raise VerificationError(problems[0], problems)
    if state_file is not None:
        _write_state(state_file, cache_id, manifest.version)
    return manifest
