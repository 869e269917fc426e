"""``takeoff-cache verify``: prove a cache is complete, unmodified, trusted and meant for this host.

The signature, format, expiry and version checks are the pure function
:func:`manifest.verify_manifest_bytes`; this module reads the files around it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, cast

from takeoff_cache.core.fsutil import atomic_write_bytes, sha256_file, temp_target
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

STATE_FORMAT = "takeoff-cache-verify-state"
_STATE_KEYS = {"format", "lineages", "caches"}


def _state_problem(state: Any) -> str | None:
    """What is wrong with the shape of a parsed state file, if anything."""
    if not isinstance(state, dict):
        return "is not a JSON object"
    if unknown := sorted(set(state) - _STATE_KEYS):
        return f"holds unknown keys {unknown}"
    if "format" in state and state["format"] != STATE_FORMAT:
        return f"has format {state['format']!r}, not {STATE_FORMAT!r}"
    for key in ("lineages", "caches"):
        table = state.get(key, {})
        if not isinstance(table, dict):
            return f"{key!r} is not an object"
        for name, entry in table.items():
            seen = entry.get("version") if isinstance(entry, dict) else None
            if type(seen) is not int or seen < 1:
                return f"{key}[{name!r}] holds no positive version"
    return None


def load_state(state_file: Path) -> dict[str, Any]:
    """The versions seen so far, from ``--state FILE``; empty when the file does not exist yet.

    Anything else that cannot be read as a state file is an error, never a fresh
    start: a fresh start would let an older cache pass.
    """
    try:
        st = os.stat(state_file)
    except FileNotFoundError:
        if os.path.lexists(state_file):
            raise VerificationError(f"state: {state_file} is a broken symlink") from None
        if not state_file.parent.is_dir():
            raise VerificationError(f"state: the folder of {state_file} does not exist") from None
        return {}
    except OSError as exc:
        raise VerificationError(f"state: cannot read {state_file}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VerificationError(f"state: {state_file} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise VerificationError(f"state: {state_file} is not a regular file")
    try:
        state = json.loads(state_file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise VerificationError(f"state: cannot read {state_file}: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise VerificationError(
            f"state: {state_file} cannot be parsed ({exc}); rollback cannot be checked"
        ) from None
    if problem := _state_problem(state):
        raise VerificationError(
            f"state: {state_file} {problem}; it is not a takeoff-cache verify state file"
        )
    return cast(dict[str, Any], state)


def _seen_version(state: dict[str, Any], manifest: Manifest, cache_id: str) -> int | None:
    lineage = manifest.lineage
    if lineage is None:
        raise VerificationError(
            "manifest has no lineage (written by an older takeoff-cache): rollback"
            " cannot be checked with --state; rebuild the cache"
        )
    entry = state.get("lineages", {}).get(lineage)
    if entry is None:
        # Written before lineages, keyed by the cache's path: still a floor for it.
        entry = state.get("caches", {}).get(cache_id)
    return int(entry["version"]) if entry is not None else None


def _write_state(
    state_file: Path, state: dict[str, Any], manifest: Manifest, cache_id: str
) -> None:
    lineages = {**state.get("lineages", {}), str(manifest.lineage): {"version": manifest.version}}
    new_state: dict[str, Any] = {"format": STATE_FORMAT, "lineages": lineages}
    legacy = {k: v for k, v in state.get("caches", {}).items() if k != cache_id}
    if legacy:
        new_state["caches"] = legacy
    try:
        # Through a symlink to its target: the link is the operator's.
        atomic_write_bytes(
            Path(os.path.realpath(state_file)),
            (json.dumps(new_state, indent=2, sort_keys=True) + "\n").encode(),
            point="verify.state",
        )
    except OSError as exc:
        raise VerificationError(f"state: cannot write {state_file}: {exc.strerror or exc}") from exc


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
    # Before anything else: a state that cannot be read must not be found out only
    # once the cache has been checked (nor be replaced by a fresh one).
    state = load_state(state_file) if state_file is not None else None
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
    manifest = verify_manifest_bytes(data, trusted)
    seen = _seen_version(state, manifest, cache_id) if state is not None else None
    if seen is not None and manifest.version < seen:
        raise VerificationError(
            f"manifest version {manifest.version} is below version {seen} already seen"
            f" for lineage {manifest.lineage} (rollback)"
        )

    problems = [p for a in manifest.artifacts if (p := _check_artifact(root, a))]
    listed = {a.path for a in manifest.artifacts}
    entries = walk_cache(root)
    unlisted = [p for p in entries.files if p not in listed]
    manifests = _staging_manifests(root, trusted, manifest.version)
    if unlisted:
        vouched = {a.path: a for m in manifests.values() for a in m.artifacts}
        for rel in unlisted:
            other = vouched.get(rel)
            if other is None or _check_artifact(root, other) is not None:
                problems.append(f"{rel}: not listed in the manifest")
    problems += [f"{rel}: not a regular file (symlink or special file)" for rel in entries.others]
    problems += _lock_problems(root)
    problems += _staging_problems(root, trusted, manifest.version, manifests)
    if host is not None and (problem := engine_host_problem(manifest, host)):
        problems.append(problem)
    if problems:
        raise VerificationError(problems[0], problems)
    if state_file is not None and state is not None:
        _write_state(state_file, state, manifest, cache_id)
    return manifest
