"""How long the work folder's stores keep a space nobody uses any more.

A store (descriptors, local features) keys its rows by a space: the engine or
extractor and everything that changes its output. When an engine is replaced,
its space's rows serve no build again; they go by one rule, here.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

# Spaces a store keeps however long unused (most recently used first); beyond
# them, a space goes once unused for a week. A pruned space is only work to
# redo: its tiles are embedded or extracted again by the next build that needs it.
KEEP_SPACES = 4
SPACE_IDLE_S = 7 * 24 * 3600.0


def stale_spaces(
    rows: Sequence[tuple[Any, str, float | None]],
    *,
    keep: int = KEEP_SPACES,
    idle_s: float = SPACE_IDLE_S,
    now: float | None = None,
) -> list[tuple[Any, str]]:
    """Of a store's spaces, ``(id, key, last used)``, the ``(id, key)`` of those neither
    among the ``keep`` most recently used nor used in the last ``idle_s`` seconds (the
    rule of every store of a work folder: descriptors, local features)."""
    now = time.time() if now is None else now
    ordered = sorted(
        rows, key=lambda row: row[2] if row[2] is not None else -math.inf, reverse=True
    )
    return [(i, key) for i, key, used in ordered[keep:] if now - (used or 0.0) > idle_s]


def date_space(db: sqlite3.Connection, space: str, now: float | None = None) -> None:
    """Date ``space`` as used ``now`` in a store's ``spaces (key, used)`` table, adding
    it if it is new; one transaction."""
    with db:
        db.execute(
            "INSERT INTO spaces (key, used) VALUES (?1, ?2)"
            " ON CONFLICT (key) DO UPDATE SET used = ?2",
            (space, time.time() if now is None else now),
        )
