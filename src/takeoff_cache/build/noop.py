"""The no-op check: the current cache is already what this request would build.

A no-op vouches for the cache as it stands, so it checks it exactly as
``verify`` does, through the same reader (:mod:`takeoff_cache.trust.cachefiles`):
the signature, every listed file's size and SHA-256, no file unlisted, no
symlink. Whatever ``verify`` would refuse, the build rebuilds (or reports).
It writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.cachefiles import file_problems, read_manifest
from takeoff_cache.trust.keys import TrustedKey
from takeoff_cache.trust.manifest import Manifest, verify_manifest_bytes


def current_manifest(cache_root: Path, trusted: tuple[TrustedKey, ...]) -> Manifest | None:
    """The manifest in force if it verifies with a trusted key, else None."""
    try:
        return verify_manifest_bytes(read_manifest(cache_root), list(trusted))
    except VerificationError:
        return None


def previous_version(cache_root: Path) -> int:
    """The version of whatever manifest is in place, trusted or not, so versions never go back."""
    try:
        doc = json.loads((cache_root / MANIFEST_NAME).read_bytes())
        version = doc["signed"]["version"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return 0
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def is_noop(
    cache_root: Path, manifest: Manifest | None, identity: str, trusted: tuple[TrustedKey, ...]
) -> bool:
    """True when ``manifest`` (the one in force) was built for ``identity`` and the
    cache's files pass every check ``verify`` makes of them."""
    if manifest is None or manifest.build_identity != identity:
        return False
    return not file_problems(cache_root, manifest, trusted)
