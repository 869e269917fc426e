"""``takeoff-cache verify``: prove a cache is complete, unmodified, trusted and meant for this host.

The signature, format, expiry and version checks are the pure function
:func:`manifest.verify_manifest_bytes`; the cache's files are read and checked by
:mod:`.cachefiles`, as every other reader of a cache reads them. This module adds
what only ``verify`` does: the rollback state and the host check.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, cast

from takeoff_cache.core.fsutil import atomic_write_bytes
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.cachefiles import file_problems, read_manifest
from takeoff_cache.trust.keys import TrustedKey
from takeoff_cache.trust.manifest import Manifest, verify_manifest_bytes

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
    manifest = verify_manifest_bytes(read_manifest(root), trusted)
    seen = _seen_version(state, manifest, cache_id) if state is not None else None
    if seen is not None and manifest.version < seen:
        raise VerificationError(
            f"manifest version {manifest.version} is below version {seen} already seen"
            f" for lineage {manifest.lineage} (rollback)"
        )

    problems = file_problems(root, manifest, trusted)
    if host is not None and (problem := engine_host_problem(manifest, host)):
        problems.append(problem)
    if problems:
        raise VerificationError(problems[0], problems)
    if state_file is not None and state is not None:
        _write_state(state_file, state, manifest, cache_id)
    return manifest
