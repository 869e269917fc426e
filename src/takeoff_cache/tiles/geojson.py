"""A mission area as plain JSON: its file read, its geometries found, its bounds, and
the normalized areas a work folder remembers.

Normalizing an area (:func:`takeoff_cache.tiles.area.parse_area`) needs shapely,
pyproj and numpy: about a quarter of a second of imports and work that a no-op
re-run must not pay. So a normalized area is remembered in the work folder,
keyed on the canonical bytes of the geometries it came from and the tool's
version (the rules live in code), and a re-run of the same request finds it
here with nothing heavier than ``json``. An entry carries the SHA-256 of the
area it holds and is used only while that still matches: a damaged entry must
not change what gets built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from takeoff_cache import __version__
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.documents import MAX_AREA_BYTES, load_json, read_document
from takeoff_cache.core.fsutil import atomic_write_bytes
from takeoff_cache.errors import InvalidRequestError

FORMAT = "takeoff-cache-area-1"
_KINDS = ("Polygon", "MultiPolygon")


def read_geojson(path: Path) -> Any:
    """The parsed JSON of an ``--area`` file (a regular file of at most
    :data:`~takeoff_cache.core.documents.MAX_AREA_BYTES`); every problem is one
    :class:`InvalidRequestError`."""
    data = read_document(path, MAX_AREA_BYTES, InvalidRequestError, "area")
    return load_json(data, str(path), InvalidRequestError, "area")


def geometries(obj: Any, source: str) -> list[dict[str, Any]]:
    """The Polygon and MultiPolygon geometries of GeoJSON, bare or in a Feature (Collection)."""
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"area: {source} is not a GeoJSON object")
    crs = obj.get("crs")
    if crs is not None and "CRS84" not in json.dumps(crs) and "4326" not in json.dumps(crs):
        raise InvalidRequestError(f"area: {source} names a CRS other than WGS84: {crs!r:.80}")
    kind = obj.get("type")
    if kind == "Feature":
        return geometries(obj.get("geometry"), source)
    if kind == "FeatureCollection":
        features = obj.get("features")
        if not isinstance(features, list) or not features:
            raise InvalidRequestError(f"area: {source}: a FeatureCollection with no features")
        return [g for f in features for g in geometries(f, source)]
    if kind in _KINDS:
        return [obj]
    raise InvalidRequestError(
        f"area: {source}: GeoJSON type {kind!r}; expected a Polygon or MultiPolygon"
    )


def bounds(area: dict[str, Any]) -> tuple[float, float, float, float]:
    """``(lat_min, lon_min, lat_max, lon_max)`` of a normalized area, the build request's
    bbox order: the extremes of its vertices, as shapely's ``bounds`` gives them."""
    lons: list[float] = []
    lats: list[float] = []

    def walk(coords: Any) -> None:
        if coords and isinstance(coords[0], int | float):
            lons.append(coords[0])
            lats.append(coords[1])
        else:
            for part in coords:
                walk(part)

    walk(area["coordinates"])
    return min(lats), min(lons), max(lats), max(lons)


def recall(folder: Path, found: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The normalized area of the geometries ``found``, if ``folder`` remembers it."""
    entry = _entry(folder, found)
    return _load(entry) if entry is not None else None


def remember(folder: Path, found: list[dict[str, Any]], area: dict[str, Any]) -> None:
    """Keep ``area``, the normalized area of the geometries ``found``, in ``folder``."""
    entry = _entry(folder, found)
    if entry is None:
        return
    doc = {"format": FORMAT, "sha256": content_key(area), "area": area}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(entry, json.dumps(doc).encode(), point="area.entry")
    except OSError:
        pass  # a work folder we cannot write to only costs the next run its speed


def _entry(folder: Path, found: list[dict[str, Any]]) -> Path | None:
    try:
        key = content_key({"format": FORMAT, "tool_version": __version__, "geometries": found})
    except (TypeError, ValueError):  # NaN, or a TOML date: parse_area says what is wrong
        return None
    return folder / f"{key[:32]}.json"


def _load(entry: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(entry.read_bytes())
        area = doc["area"]
        if doc["format"] != FORMAT or area["type"] not in _KINDS:
            return None
        if content_key(area) != doc["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return area if isinstance(area, dict) else None
