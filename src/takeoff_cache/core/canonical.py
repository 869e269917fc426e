"""Canonical JSON: the one serialization that keys, identities and signatures hash.

Keys sorted, no whitespace, UTF-8, no NaN or infinities; see trust/manifest.py for
the full rule as it applies to signatures.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def content_key(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()
