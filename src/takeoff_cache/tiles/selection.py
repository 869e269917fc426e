"""The select phase, remembered per MBTiles file, so a no-op re-run does not re-hash every tile.

Selecting hashes every selected tile's bytes (the corpus fingerprint needs
them): about a second for 10 000 tiles, most of a no-op run. The result is
kept in the work folder, one entry per (corpus file, bbox, zoom levels, area), and
used only while the file still has the identity it had when the entry was
made: device, inode, size, mtime and ctime of the MBTiles file and of its
SQLite ``-wal`` and ``-journal`` companions (a WAL-mode write changes only the
``-wal`` file). Any write changes ctime, which no program can set back.

One hole remains: a write within the file system's timestamp granularity of
the read could leave every field equal. So, as git does for its index, a
selection read less than :data:`RACY_S` after the file's last change is
never remembered, and an entry is only written when the file did not change
while it was read. XYZ folders are not remembered: checking every file's
identity costs about what reading them does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from takeoff_cache import __version__
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.fsutil import atomic_write_bytes
from takeoff_cache.tiles.corpus import Tile, TileSelection, fingerprint, select_tiles

FORMAT = "takeoff-cache-selection-1"
RACY_S = 2.0
_COMPANIONS = ("", "-wal", "-journal")


def _signature(corpus: Path) -> list[list[int] | None]:
    out: list[list[int] | None] = []
    for suffix in _COMPANIONS:
        try:
            st = os.stat(f"{corpus}{suffix}")
        except FileNotFoundError:
            out.append(None)
            continue
        out.append([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _last_change_ns(signature: list[list[int] | None]) -> int:
    return max((max(s[3], s[4]) for s in signature if s is not None), default=0)


def _entry_path(
    cache_dir: Path,
    corpus: Path,
    bbox: tuple[float, ...],
    zooms: tuple[int, ...],
    area: dict[str, Any] | None,
) -> Path:
    fields: dict[str, Any] = {
        "corpus": str(corpus.resolve()),
        "bbox": list(bbox),
        "zoom_levels": list(zooms),
        # Selection rules live in code: another version may select differently.
        "tool_version": __version__,
        "format": FORMAT,
    }
    if area is not None:  # entries made without an area keep their keys
        fields["area"] = area
    key = content_key(fields)
    return cache_dir / f"{key[:32]}.json"


def _load(entry: Path, signature: list[list[int] | None]) -> TileSelection | None:
    try:
        doc: Any = json.loads(entry.read_bytes())
        if doc["format"] != FORMAT or doc["signature"] != signature:
            return None
        tiles = tuple(Tile(int(z), int(x), int(y), str(sha)) for z, x, y, sha in doc["tiles"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A damaged entry fails here rather than being trusted.
    found = fingerprint(tiles)
    return TileSelection(tiles, found) if found == doc["fingerprint"] else None


def select_tiles_cached(
    corpus: Path,
    bbox: tuple[float, float, float, float],
    zoom_levels: tuple[int, ...],
    cache_dir: Path,
    *,
    area: dict[str, Any] | None = None,
    racy_s: float = RACY_S,
) -> TileSelection:
    """:func:`corpus.select_tiles`, from the work folder when the corpus file is unchanged."""
    if corpus.is_dir():
        return select_tiles(corpus, bbox, zoom_levels, area)
    started_ns = time.time_ns()
    before = _signature(corpus)
    entry = _entry_path(cache_dir, corpus, bbox, zoom_levels, area)
    cached = _load(entry, before)
    if cached is not None:
        return cached
    selection = select_tiles(corpus, bbox, zoom_levels, area)
    if _signature(corpus) == before and started_ns - _last_change_ns(before) >= racy_s * 1e9:
        doc = {
            "format": FORMAT,
            "signature": before,
            "fingerprint": selection.fingerprint,
            "tiles": [[t.z, t.x, t.y, t.sha256] for t in selection.tiles],
        }
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(
                entry, json.dumps(doc, separators=(",", ":")).encode(), point="selection.entry"
            )
        except OSError:
            pass  # a work folder we cannot write to only costs the next run its speed
    return selection
