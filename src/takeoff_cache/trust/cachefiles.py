"""The one reader of a cache's files: ``Manifest.json``'s bytes, and every file
under the cache root checked against a verified manifest.

``verify``, the build's no-op check, ``inspect`` and ``locate`` all read a cache
through here, so none of them can accept a cache that another refuses. It
loads nothing heavier than hashlib: a no-op re-run pays for the artifacts'
hashes and nothing else.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from takeoff_cache.core.fsutil import sha256_file, temp_target
from takeoff_cache.core.layout import (
    LOCK_NAME,
    MANIFEST_NAME,
    PENDING_MANIFEST,
    RETIRED_MANIFEST,
    STAGING_NAME,
    walk_cache,
)
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.keys import TrustedKey
from takeoff_cache.trust.manifest import Artifact, Manifest, verify_manifest_bytes


def read_manifest(cache_root: Path) -> bytes:
    """The bytes of ``cache_root``'s ``Manifest.json``; a :class:`VerificationError` when
    it is missing, unreadable, or anything but a regular file."""
    path = cache_root / MANIFEST_NAME
    try:
        # lstat first: a symlink may lead anywhere, a FIFO would block the open
        # and a device could be read forever.
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise VerificationError(f"{MANIFEST_NAME} is a symlink; it must be a regular file")
        if stat.S_ISDIR(mode):
            raise VerificationError(f"{MANIFEST_NAME} is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise VerificationError(f"{MANIFEST_NAME} is not a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        raise VerificationError(f"{MANIFEST_NAME} is missing from {cache_root}") from None
    except OSError as exc:
        raise VerificationError(f"{MANIFEST_NAME} cannot be read: {exc.strerror}") from None


def file_problems(cache_root: Path, manifest: Manifest, trusted: Sequence[TrustedKey]) -> list[str]:
    """Every way the files under ``cache_root`` differ from what ``manifest`` (verified)
    vouches for, one line each; empty when the cache is exactly what it lists.

    Every listed artifact is a regular file with its recorded size and SHA-256,
    reached through real folders; no other file is there, but what a commit in
    progress leaves and a signed manifest in staging vouches for; the lock file
    is empty.
    """
    root = cache_root.resolve()
    keys = list(trusted)
    problems = [p for a in manifest.artifacts if (p := _check_artifact(root, a))]
    listed = {a.path for a in manifest.artifacts}
    entries = walk_cache(root)
    unlisted = [p for p in entries.files if p not in listed]
    manifests = _staging_manifests(root, keys, manifest.version)
    if unlisted:
        vouched = {a.path: a for m in manifests.values() for a in m.artifacts}
        for rel in unlisted:
            other = vouched.get(rel)
            if other is None or _check_artifact(root, other) is not None:
                problems.append(f"{rel}: not listed in the manifest")
    problems += [f"{rel}: not a regular file (symlink or special file)" for rel in entries.others]
    problems += _lock_problems(root)
    problems += _staging_problems(root, keys, manifest.version, manifests)
    return problems


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


def _staging_manifests(root: Path, trusted: list[TrustedKey], version: int) -> dict[str, Manifest]:
    """The signed manifests in staging that a commit in progress can have left, by name.

    Only what a commit leaves counts: the pending manifest is the current version
    + 1; the retired one is the current manifest itself (kept, not yet replaced)
    or, past the commit point, the version - 1. An older signed manifest dropped
    into staging vouches for nothing.
    """
    found = {}
    for name, expected in (
        (PENDING_MANIFEST, {version + 1}),
        (RETIRED_MANIFEST, {version, version - 1}),
    ):
        other = _signed_manifest(root / STAGING_NAME / name, trusted, expected)
        if other is not None:
            found[name] = other
    return found


def _signed_manifest(path: Path, trusted: list[TrustedKey], versions: set[int]) -> Manifest | None:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        other = verify_manifest_bytes(path.read_bytes(), trusted, check_expiry=False)
    except (OSError, VerificationError):
        return None
    return other if other.version in versions else None


def _staging_problems(
    root: Path, trusted: list[TrustedKey], version: int, manifests: dict[str, Manifest]
) -> list[str]:
    """Every entry of ``.staging/`` must be accounted for by a signed manifest there.

    A file passes when it is one of those manifests, or a copy of an artifact one
    of them lists (same size and SHA-256), or the temporary file of such a copy
    cut short (no larger than the artifact) or of such a manifest (complete and
    signed): what a build killed mid-commit leaves, and nothing else.
    """
    staging = root / STAGING_NAME
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        return [f"{STAGING_NAME}: not a folder"]
    if not staging.is_dir():
        return []
    vouched = {a.path: a for m in manifests.values() for a in m.artifacts}
    versions = {PENDING_MANIFEST: {version + 1}, RETIRED_MANIFEST: {version, version - 1}}
    problems = []
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            shown = full.relative_to(root).as_posix()
            rel = full.relative_to(staging).as_posix()
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{shown}: not a regular file")
                continue
            if rel in versions:
                if rel not in manifests:
                    problems.append(
                        f"{shown}: not a manifest of this cache signed by a trusted key"
                    )
                continue
            artifact = vouched.get(rel)
            if artifact is not None and _check_artifact(staging, artifact) is None:
                continue
            target = temp_target(name)
            if target is not None:
                meant = (Path(rel).parent / target).as_posix()
                if meant in vouched and st.st_size <= vouched[meant].size:
                    continue  # a copy cut short
                if meant in versions and _signed_manifest(full, trusted, versions[meant]):
                    continue  # written and signed, not yet renamed
            problems.append(f"{shown}: not vouched for by a signed manifest in {STAGING_NAME}")
    return problems


def _lock_problems(root: Path) -> list[str]:
    """The lock file is only ever locked, never written: it may hide nothing."""
    lock = root / LOCK_NAME
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return []
    if not stat.S_ISREG(st.st_mode):
        return [f"{LOCK_NAME}: not a regular file"]
    if st.st_size:
        return [f"{LOCK_NAME}: holds {st.st_size} bytes; the lock file is always empty"]
    return []
