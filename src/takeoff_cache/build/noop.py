"""The no-op check: the current cache is already what this request would build.

It reads Manifest.json and checks every listed file's size and SHA-256 — a
file damaged in place keeps its size, and a no-op must never vouch for a
cache that fails ``verify``. It writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from takeoff_cache.core.fsutil import sha256_file
from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.keys import TrustedKey
from takeoff_cache.trust.manifest import Manifest, verify_manifest_bytes


def current_manifest(cache_root: Path, trusted: tuple[TrustedKey, ...]) -> Manifest | None:
    """The manifest in force if it verifies with a trusted key, else None."""
    try:
        data = (cache_root / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return verify_manifest_bytes(data, list(trusted))
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


def is_noop(cache_root: Path, manifest: Manifest | None, identity: str) -> bool:
    if manifest is None or manifest.build_identity != identity:
        return False
    for artifact in manifest.artifacts:
        path = cache_root / artifact.path
        try:
            st = path.lstat()
        except OSError:
            return False
        if not path.is_file() or path.is_symlink() or st.st_size != artifact.size:
            return False
    return all(sha256_file(cache_root / a.path) == a.sha256 for a in manifest.artifacts)
