"""The mission area: what a flight needs tiles of, and which tiles those are.

An area is a GeoJSON Polygon or MultiPolygon in WGS84 (RFC 7946: ``[lon, lat]``,
exterior rings counter-clockwise), coordinates rounded to 1e-7 degrees (about
1 cm) so that the same flight always gives the same bytes. A flight's own area
(its path, corridors and shapes buffered in metres) is drawn in
``takeoff_cache.prepare.area``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray
from pyproj import Geod
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from takeoff_cache.core.tilemath import MAX_LAT
from takeoff_cache.errors import AntimeridianError, InvalidRequestError
from takeoff_cache.tiles.geojson import bounds, geometries, read_geojson

DEFAULT_BUFFER_M = 500.0
_DIGITS = 7
_GEOD = Geod(ellps="WGS84")
_EDGE = 1e-6  # as in tilemath: a tile touching the area along an edge is not in it


@dataclass(frozen=True)
class Area:
    """A mission area: its GeoJSON geometry (WGS84) and its size on the ellipsoid."""

    geojson: dict[str, Any]
    km2: float
    # What the operator should know about how the area was drawn (a far element).
    warnings: tuple[str, ...] = ()

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(lat_min, lon_min, lat_max, lon_max)``, the build request's bbox order."""
        return bounds(self.geojson)


def area_of(geometry: BaseGeometry, source: str) -> Area:
    """The area of a WGS84 geometry: checked, clipped to Web-Mercator, canonical."""
    check_antimeridian(geometry, f"the area of {source}")
    return _area(_web_mercator_part(geometry))


def parse_area(obj: Any, source: str) -> Area:
    """An area from GeoJSON: a Polygon or MultiPolygon, bare or in a Feature (Collection)."""
    polygons: list[BaseGeometry] = []
    for geometry in geometries(obj, source):
        kind = geometry.get("type")
        if kind not in ("Polygon", "MultiPolygon"):
            raise InvalidRequestError(
                f"area: {source}: a {kind!r} geometry; expected a Polygon or MultiPolygon"
            )
        if not _finite(geometry.get("coordinates")):
            raise InvalidRequestError(f"area: {source}: the {kind} has non-finite coordinates")
        try:
            geom = shape(geometry)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise InvalidRequestError(
                f"area: {source}: the {kind} coordinates are not rings of [lon, lat]: {exc}"
            ) from None
        if geom.is_empty or not geom.is_valid:
            why = "it is empty" if geom.is_empty else shapely.is_valid_reason(geom)
            raise InvalidRequestError(f"area: {source}: the {kind} is not valid: {why}")
        lon_min, lat_min, lon_max, lat_max = geom.bounds
        if not (
            max(abs(lon_min), abs(lon_max)) <= 180 and max(abs(lat_min), abs(lat_max)) <= MAX_LAT
        ):
            raise InvalidRequestError(
                f"area: {source}: the {kind} reaches lon {lon_min:g}..{lon_max:g},"
                f" lat {lat_min:g}..{lat_max:g}: expected WGS84 [lon, lat] with lon in"
                f" [-180, 180] and lat in [-{MAX_LAT:.4f}, {MAX_LAT:.4f}] (Web Mercator)"
            )
        polygons.append(geom)
    return _area(shapely.union_all(polygons))


def _finite(coordinates: Any) -> bool:
    """Whether no number in GeoJSON coordinates is NaN or infinite (JSON's NaN, Infinity)."""
    stack = [coordinates]
    while stack:
        value = stack.pop()
        if isinstance(value, list | tuple):
            stack.extend(value)
        elif isinstance(value, float) and not math.isfinite(value):
            return False
    return True


def load_area(path: Path) -> Area:
    """Read an ``--area`` GeoJSON file; every problem is one :class:`InvalidRequestError` line."""
    return parse_area(read_geojson(path), str(path))


def tiles_for_area(
    area_geojson: dict[str, Any], zoom_levels: Iterable[int]
) -> list[tuple[int, int, int]]:
    """Sorted ``(z, x, y)`` of every tile whose Web-Mercator square shares area with the area.

    In tile coordinates a tile is a unit square, so one horizontal strip per tile
    row is cut out of the area: each connected piece of a strip covers exactly the
    columns its x extent spans. The work grows with rows, not with the bbox's tiles,
    so a diagonal corridor costs as little as a square.
    """
    geometry = shape(area_geojson)
    out: list[tuple[int, int, int]] = []
    for z in sorted(set(zoom_levels)):
        for y, spans in _rows(geometry, z):
            out.extend((z, x, y) for first, last in spans for x in range(first, last + 1))
    out.sort()
    return out


def area_spans(
    area_geojson: dict[str, Any], zoom_levels: Iterable[int]
) -> Iterator[tuple[int, int, int, int]]:
    """``(z, y, x_first, x_last)``: the runs of adjacent tiles :func:`tiles_for_area`
    lists, zoom by zoom and row by row, made as they are read (one row in memory)."""
    geometry = shape(area_geojson)
    for z in sorted(set(zoom_levels)):
        for y, spans in _rows(geometry, z):
            for first, last in spans:
                yield z, y, first, last


def count_area_tiles(area_geojson: dict[str, Any], zoom_levels: Iterable[int]) -> int:
    """``len(tiles_for_area(...))``, counted row by row: memory stays that of one row."""
    geometry = shape(area_geojson)
    return sum(
        last - first + 1
        for z in set(zoom_levels)
        for _, spans in _rows(geometry, z)
        for first, last in spans
    )


def tile_count_bounds(area_geojson: dict[str, Any], zoom_levels: Iterable[int]) -> tuple[int, int]:
    """``(lower, upper)`` bounds on :func:`count_area_tiles`, from the geometry alone.

    Work and memory grow with the area's vertices, not its tiles. In tile
    coordinates the selected tiles cover the area, so there are at least as many
    as its area in tiles. Those not wholly inside it each meet its outline, and a
    segment of length ``l`` meets at most ``3 + 2 l`` unit squares; the others fit
    inside, at most its area of them. Neither bound exceeds the bbox's tile count.
    """
    geometry = shape(area_geojson)
    lower = upper = 0
    for z in set(zoom_levels):
        n = 2**z
        tiles = shapely.transform(geometry, functools.partial(_fractional_tiles, n=n))
        x_min, y_min, x_max, y_max = tiles.bounds
        box = (math.ceil(x_max) - math.floor(x_min)) * (math.ceil(y_max) - math.floor(y_min))
        outline = shapely.get_num_coordinates(tiles.boundary)
        # _EDGE lets slivers of up to 1e-6 tile along the outline go uncounted.
        lower += max(0, math.floor(tiles.area - 2 * _EDGE * tiles.length) - 1)
        upper += min(box, math.ceil(tiles.area + 3 * outline + 2 * tiles.length))
    return min(lower, upper), upper


def _rows(geometry: BaseGeometry, z: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """``(y, [(first, last), ...])``: each tile row of the area at zoom ``z`` and the
    column spans of it the area covers, row by row (see :func:`tiles_for_area`)."""
    n = 2**z
    tiles = shapely.transform(geometry, functools.partial(_fractional_tiles, n=n))
    x_min, y_min, x_max, y_max = tiles.bounds
    row0 = max(0, math.floor(y_min + _EDGE))
    row1 = min(n - 1, math.ceil(y_max - _EDGE) - 1)
    shapely.prepare(tiles)
    for y in range(row0, row1 + 1):
        strip = shapely.clip_by_rect(tiles, x_min - 1, y, x_max + 1, y + 1)
        spans: list[tuple[int, int]] = []
        for piece in getattr(strip, "geoms", [strip]):
            # Pieces that only touch the strip's edge are lines or points: no area.
            if piece.geom_type != "Polygon" or piece.area == 0:
                continue
            px0, _, px1, _ = piece.bounds
            first = max(0, math.floor(px0 + _EDGE))
            last = min(n - 1, max(first, math.ceil(px1 - _EDGE) - 1))
            spans.append((first, last))
        yield y, _merged(spans)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching column spans joined, in order."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


# --------------------------------------------------------------------------- helpers


def check_antimeridian(geometry: BaseGeometry, what: str) -> None:
    """Refuse ``what`` (a WGS84 geometry drawn from a flight) if it went over the antimeridian."""
    # Back in degrees, a ring that went over the antimeridian jumps by ~360 degrees
    # of longitude between neighbouring vertices (the densified edges are short).
    for polygon in getattr(geometry, "geoms", [geometry]):
        for ring in (polygon.exterior, *polygon.interiors):
            lons = np.asarray(ring.coords)[:, 0]
            if lons.size and float(np.max(np.abs(np.diff(lons)))) > 180.0:
                raise AntimeridianError(
                    f"area: {what} crosses the antimeridian; split the flight into one on each side"
                )


def _web_mercator_part(geometry: BaseGeometry) -> BaseGeometry:
    """The part of the area Web-Mercator tiles can show (none exist beyond ~85.05°)."""
    clipped = shapely.clip_by_rect(geometry, -180.0, -MAX_LAT, 180.0, MAX_LAT)
    if clipped.is_empty:
        raise InvalidRequestError("area: the flight lies beyond 85.05° of latitude: no tiles")
    return clipped


def _area(geometry: BaseGeometry) -> Area:
    # normalize() fixes ring order and start points, so equal areas give equal GeoJSON.
    rounded = shapely.normalize(shapely.set_precision(geometry, 10.0**-_DIGITS))
    polygons = [
        orient(g, sign=1.0)
        for g in getattr(rounded, "geoms", [rounded])
        if g.geom_type == "Polygon" and g.area > 0
    ]
    if not polygons:
        raise InvalidRequestError("area: nothing is left of the area at 1e-7 degrees")
    canonical = polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
    km2 = abs(_GEOD.geometry_area_perimeter(canonical)[0]) / 1e6
    return Area(_geojson(canonical), km2)


def _geojson(geometry: Polygon | MultiPolygon) -> dict[str, Any]:
    """GeoJSON of a polygon or multipolygon as lists of floats rounded to 1e-7 degrees,
    ring by ring with numpy (a continent's outline has tens of thousands of vertices)."""

    def rings(polygon: Polygon) -> list[Any]:
        return [
            np.round(np.asarray(ring.coords)[:, :2], _DIGITS).tolist()
            for ring in (polygon.exterior, *polygon.interiors)
        ]

    if isinstance(geometry, Polygon):
        return {"type": "Polygon", "coordinates": rings(geometry)}
    return {"type": "MultiPolygon", "coordinates": [rings(p) for p in geometry.geoms]}


def _fractional_tiles(coords: NDArray[np.float64], n: int) -> NDArray[np.float64]:
    """``[lon, lat]`` rows to fractional tile ``[x, y]`` at ``n`` tiles a side (tilemath's
    formula, for many points at once)."""
    lon = coords[:, 0]
    lat = np.radians(np.clip(coords[:, 1], -MAX_LAT, MAX_LAT))
    x = (lon + 180.0) / 360.0 * n
    y = (1.0 - np.arcsinh(np.tan(lat)) / math.pi) / 2.0 * n
    return np.column_stack([x, y])
