"""A flight's area: the union of the flown path (home first, as a line), the
corridors (each buffered by half its width), every polygon, circle and point the
flight names, all buffered by ``buffer_m`` metres.

Buffers are computed in an azimuthal equidistant projection centred on the
flight, where a metre is a metre in every direction at any latitude; the result
goes back to WGS84 densified (no edge longer than 200 m before reprojection), so
straight lines in metres stay close to the reprojected outline, and is measured
on the ellipsoid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import shapely
from numpy.typing import NDArray
from pyproj import CRS, Transformer
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry

from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.prepare.flight import Flight
from takeoff_cache.tiles.area import DEFAULT_BUFFER_M, Area, area_of

_QUAD_SEGS = 16  # a buffered point is a 64-gon: 0.16% short of the circle's area
_DENSIFY_M = 200.0


def flight_area(flight: Flight, buffer_m: float = DEFAULT_BUFFER_M) -> Area:
    """The flight's area, every part of it buffered by ``buffer_m`` metres."""
    if not (math.isfinite(buffer_m) and buffer_m >= 0):
        raise InvalidRequestError(f"buffer_m: {buffer_m} must be a number of metres >= 0")
    lat0, lon0 = _centre(flight)
    local = CRS.from_proj4(f"+proj=aeqd +lat_0={lat0} +lon_0={lon0} +datum=WGS84 +units=m")
    forward = Transformer.from_crs("EPSG:4326", local, always_xy=True)
    back = Transformer.from_crs(local, "EPSG:4326", always_xy=True)

    def xy(points: Iterable[tuple[float, ...]]) -> list[tuple[float, float]]:
        lats_lons = list(points)
        xs, ys = forward.transform([p[1] for p in lats_lons], [p[0] for p in lats_lons])
        return list(zip(np.atleast_1d(xs).tolist(), np.atleast_1d(ys).tolist(), strict=True))

    parts: list[BaseGeometry] = []
    home = () if flight.planned_home is None else (flight.planned_home,)
    path = xy((*home, *flight.positions))
    if len(path) >= 2:
        parts.append(LineString(path).buffer(buffer_m, quad_segs=_QUAD_SEGS))
    elif path:
        parts.append(Point(path[0]).buffer(buffer_m, quad_segs=_QUAD_SEGS))
    for corridor in flight.corridors:
        line = LineString(xy(corridor.line))
        parts.append(line.buffer(corridor.width_m / 2 + buffer_m, quad_segs=_QUAD_SEGS))
    for ring in flight.polygons:
        polygon = shapely.make_valid(Polygon(xy(ring)))  # a hand-drawn ring may cross itself
        parts.append(polygon.buffer(buffer_m, quad_segs=_QUAD_SEGS))
    for circle in flight.circles:
        centre = Point(xy([circle.center])[0])
        parts.append(centre.buffer(circle.radius_m + buffer_m, quad_segs=_QUAD_SEGS))
    for point in flight.points:
        parts.append(Point(xy([point])[0]).buffer(buffer_m, quad_segs=_QUAD_SEGS))
    merged = shapely.union_all([p for p in parts if not p.is_empty])
    if merged.is_empty or merged.area == 0:
        raise InvalidRequestError(
            f"area: the flight {flight.source} encloses no area with buffer_m {buffer_m:g};"
            " give a buffer above 0"
        )
    dense = shapely.segmentize(merged, _DENSIFY_M)

    def to_lonlat(coords: NDArray[np.float64]) -> NDArray[np.float64]:
        lons, lats = back.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([lons, lats])

    return area_of(shapely.transform(dense, to_lonlat), flight.source)


def _centre(flight: Flight) -> tuple[float, float]:
    """The middle of the flight's extent: the projection is truest near it."""
    lats: list[float] = []
    lons: list[float] = []
    for p in (*flight.positions, *flight.points, *(c.center for c in flight.circles)):
        lats.append(p[0])
        lons.append(p[1])
    for chain in (*(c.line for c in flight.corridors), *flight.polygons):
        lats.extend(p[0] for p in chain)
        lons.extend(p[1] for p in chain)
    if flight.planned_home is not None:
        lats.append(flight.planned_home[0])
        lons.append(flight.planned_home[1])
    return (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
