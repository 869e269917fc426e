"""The work folder: what a build machine keeps between builds and never flies.

Its layout is defined here only: every other module asks for its folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from takeoff_cache.core.fsutil import is_temp_name
from takeoff_cache.errors import CacheIOError


def default_work_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "takeoff-cache"


def resolve_work_dir(value: str | Path | None) -> Path:
    path = Path(value).expanduser().resolve() if value else default_work_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheIOError(f"work folder: cannot create {path}: {exc.strerror}") from exc
    return path


# Indexes kept in the work folder, most recently used first. An older one is only
# an accelerator: its cache holds its own link to the file, and a build that
# wants it again rebuilds it from the descriptor store.
KEEP_INDEXES = 4
# Nothing younger goes: a build of another cache, sharing this work folder, may
# have written it a moment ago and not yet linked it into its staging folder.
PRUNE_AFTER_S = 3600.0
# An index is two files: the faiss index and its row -> tile map.
INDEX_SUFFIXES = (".faiss", ".tiles.json")


def engines_dir(work: Path) -> Path:
    """The engine store: compiled engines and their records (engines/store.py)."""
    return work / "engines"


def tensorrt_dir(work: Path) -> Path:
    """TensorRT's timing and INT8 calibration caches, reused across engine builds."""
    return work / "tensorrt"


def store_path(work: Path) -> Path:
    """The descriptor store, shared by every cache built with this work folder."""
    return work / "descriptors.sqlite"


def indexes_dir(work: Path) -> Path:
    return work / "indexes"


def features_store_path(work: Path) -> Path:
    """The feature store: per-tile local features, shared like the descriptor store."""
    return work / "features.sqlite"


def features_dir(work: Path) -> Path:
    """The features files written for caches (one per extractor and selection)."""
    return work / "features"


def selections_dir(work: Path) -> Path:
    """Remembered tile selections (tiles/selection.py)."""
    return work / "selections"


def maps_dir(work: Path) -> Path:
    """Coverage maps, one per cache root, redrawn by each build's self-test."""
    return work / "maps"


def checked_backbones_dir(work: Path) -> Path:
    """Markers of backbone graphs that passed their check (backbones/file.py)."""
    return work / "checked-backbones"


def registered_views_dir(work: Path) -> Path:
    """The self-test's registered views, by what decides them (localize/registered.py)."""
    return work / "registered-views"


def normalized_areas_dir(work: Path) -> Path:
    """Mission areas normalized once, by the GeoJSON they came from (tiles/geojson.py)."""
    return work / "normalized-areas"


def tiles_dir(work: Path) -> Path:
    """``prepare``'s tile corpora."""
    return work / "tiles"


def default_corpus_path(work: Path) -> Path:
    """The corpus ``prepare`` downloads into and builds from unless told otherwise:
    one name, whatever the tile server, so a run offline (no ``--tiles-url``) finds
    what an earlier run downloaded. Older releases named it after the server's host
    and port (``tiles/<host>-<port>.mbtiles``); ``prepare`` still finds those."""
    return tiles_dir(work) / "tiles.mbtiles"


def corpus_lock_path(corpus: Path) -> Path:
    """The workstation lock of a corpus file, beside it: two ``prepare`` runs that
    would write one corpus meet there whatever their work folders."""
    return corpus.with_name(f"{corpus.name}.lock")


def areas_dir(work: Path) -> Path:
    """The mission areas ``prepare`` writes, one GeoJSON per flight, for the build's ``--area``."""
    return work / "areas"


def index_files(folder: Path, stem: str) -> tuple[Path, Path]:
    """The faiss index and the tile map of index ``stem`` in ``folder``."""
    index, tile_map = (folder / f"{stem}{suffix}" for suffix in INDEX_SUFFIXES)
    return index, tile_map


def touch_index(index_path: Path, map_path: Path) -> None:
    """Mark an index as used now (a build took it from Prefect's cache)."""
    for path in (index_path, map_path):
        os.utime(path)


def prune_indexes(
    work: Path,
    *,
    keep: int = KEEP_INDEXES,
    older_than_s: float = PRUNE_AFTER_S,
    now: float | None = None,
) -> list[Path]:
    """Delete indexes of ``work``/indexes beyond the ``keep`` most recently used,
    and temporary files that killed builds left; return what went.

    Each changed corpus writes a new index (64 MB for 50 000 tiles), so without
    this the work folder only grows.
    """
    folder = indexes_dir(work)
    now = time.time() if now is None else now
    used: dict[str, float] = {}
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # removed meanwhile by another build's pruning
        if is_temp_name(entry.name):
            if now - mtime > older_than_s:
                removed += _unlink(Path(entry.path))
            continue
        for suffix in INDEX_SUFFIXES:
            if entry.name.endswith(suffix):
                stem = entry.name[: -len(suffix)]
                used[stem] = max(used.get(stem, 0.0), mtime)
    by_use = sorted(used.items(), key=lambda item: item[1], reverse=True)
    for stem, mtime in by_use[keep:]:
        if now - mtime > older_than_s:
            for path in index_files(folder, stem):
                removed += _unlink(path)
    return removed


def prune_features(
    work: Path,
    *,
    keep: int = KEEP_INDEXES,
    older_than_s: float = PRUNE_AFTER_S,
    now: float | None = None,
) -> list[Path]:
    """Delete features files of ``work``/features beyond the ``keep`` most recently
    written, and temporary files killed builds left; return what went. Like an index,
    a features file is only an accelerator here: the cache holds its own copy."""
    folder = features_dir(work)
    now = time.time() if now is None else now
    try:
        entries = [(e, e.stat(follow_symlinks=False).st_mtime) for e in os.scandir(folder)]
    except FileNotFoundError:
        return []
    removed: list[Path] = []
    kept = sorted(
        ((e, m) for e, m in entries if not is_temp_name(e.name)), key=lambda em: em[1], reverse=True
    )
    old = [(e, m) for e, m in entries if is_temp_name(e.name)] + kept[keep:]
    for entry, mtime in old:
        if now - mtime > older_than_s:
            removed += _unlink(Path(entry.path))
    return removed


def _unlink(path: Path) -> list[Path]:
    try:
        path.unlink()
    except FileNotFoundError:
        return []
    return [path]
