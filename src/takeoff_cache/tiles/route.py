"""A flight's route: the path the drone flies, in order, and distances along it.

The route is what the readiness verdict (SPEC §11) is about: the tiles under it
are where a hole blinds the drone, and the self-test draws its views along it.
It travels in the build request as a GeoJSON ``LineString`` (WGS84, ``[lon, lat]``
or ``[lon, lat, alt]`` with the altitude in metres), inline in TOML or as a file.

Distances are great-circle metres on the mean Earth sphere; along a segment the
positions are interpolated linearly in degrees, which for segments of a few
kilometres is within centimetres of the geodesic.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from takeoff_cache.core.tilemath import EARTH_RADIUS_M, MAX_LAT, haversine_m
from takeoff_cache.errors import InvalidRequestError

# A route of more points than this is not a flight plan (QGC caps missions far lower).
MAX_ROUTE_POINTS = 100_000


@dataclass(frozen=True)
class RoutePoint:
    """A position on the route: where, how far from takeoff, and which way it heads."""

    lat: float
    lon: float
    km: float
    heading_deg: float
    alt_m: float | None


@dataclass(frozen=True)
class Route:
    """The positions flown, in order: ``(lat, lon)`` or ``(lat, lon, alt_m)``."""

    points: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise InvalidRequestError("route: needs at least one position")

    @property
    def cumulative_m(self) -> tuple[float, ...]:
        """Metres from the first position to each position."""
        total, out = 0.0, [0.0]
        for a, b in itertools.pairwise(self.points):
            total += haversine_m(a[0], a[1], b[0], b[1])
            out.append(total)
        return tuple(out)

    @property
    def length_km(self) -> float:
        return self.cumulative_m[-1] / 1000.0

    @property
    def altitudes(self) -> tuple[float, ...]:
        """The altitudes the route gives (metres), in order; empty when it gives none."""
        return tuple(p[2] for p in self.points if len(p) > 2)

    def sample(self, spacing_m: float) -> Iterator[RoutePoint]:
        """Positions every ``spacing_m`` metres along the route, its ends included.

        A route of one position (or of positions all in one place) yields that
        position once, heading north.
        """
        if not (math.isfinite(spacing_m) and spacing_m > 0):
            raise ValueError(f"spacing must be positive, not {spacing_m}")
        cum = self.cumulative_m
        total = cum[-1]
        if total == 0.0:
            p = self.points[0]
            yield RoutePoint(p[0], p[1], 0.0, 0.0, _alt(p))
            return
        steps = max(1, math.ceil(total / spacing_m))
        seg = 0
        for i in range(steps + 1):
            d = min(total, i * total / steps)
            while seg < len(cum) - 2 and cum[seg + 1] < d:
                seg += 1
            yield self._at(seg, d, cum)

    def _at(self, seg: int, d: float, cum: Sequence[float]) -> RoutePoint:
        a, b = self.points[seg], self.points[seg + 1]
        length = cum[seg + 1] - cum[seg]
        t = 0.0 if length == 0.0 else (d - cum[seg]) / length
        lat = a[0] + t * (b[0] - a[0])
        lon = a[1] + t * (b[1] - a[1])
        alt_a, alt_b = _alt(a), _alt(b)
        alt = None if alt_a is None or alt_b is None else alt_a + t * (alt_b - alt_a)
        return RoutePoint(lat, lon, d / 1000.0, bearing_deg(a[0], a[1], b[0], b[1]), alt)

    def km_of(self, lat: float, lon: float) -> float:
        """Kilometres from takeoff of the route's position nearest to ``(lat, lon)``.

        Each segment is treated as flat around the point (an equirectangular frame),
        which is exact enough to say where along a route a tile falls.
        """
        cum = self.cumulative_m
        if len(self.points) == 1:
            return 0.0
        best_m, best_along = math.inf, 0.0
        kx = math.cos(math.radians(lat))
        for i, (a, b) in enumerate(itertools.pairwise(self.points)):
            ax, ay = (a[1] - lon) * kx, a[0] - lat
            bx, by = (b[1] - lon) * kx, b[0] - lat
            dx, dy = bx - ax, by - ay
            span = dx * dx + dy * dy
            t = 0.0 if span == 0.0 else max(0.0, min(1.0, -(ax * dx + ay * dy) / span))
            gap = math.hypot(ax + t * dx, ay + t * dy)
            if gap < best_m:
                best_m, best_along = gap, cum[i] + t * (cum[i + 1] - cum[i])
        return best_along / 1000.0

    def corridor(self, half_width_m: float) -> dict[str, Any]:
        """The ground within ``half_width_m`` metres of the route, as a GeoJSON Polygon
        (or MultiPolygon) in WGS84: what a camera over the route sees.

        Buffered in a local equirectangular frame (metres east and north of the
        route's middle); across a route spanning 1 degree of latitude its east-west
        scale errs by under 2%, a few metres on a 150 m half-width.
        """
        if not (math.isfinite(half_width_m) and half_width_m > 0):
            raise ValueError(f"half-width must be positive, not {half_width_m}")
        import shapely  # only the coverage check loads shapely for a route
        from shapely.geometry import LineString, Point, mapping

        lats = [p[0] for p in self.points]
        lons = [p[1] for p in self.points]
        lat0, lon0 = (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
        m_per_deg = math.pi * EARTH_RADIUS_M / 180.0
        kx = m_per_deg * math.cos(math.radians(lat0))
        xy = [
            ((lon - lon0) * kx, (lat - lat0) * m_per_deg)
            for lat, lon in zip(lats, lons, strict=True)
        ]
        shape = LineString(xy) if len(set(xy)) > 1 else Point(xy[0])
        ground = shape.buffer(half_width_m, quad_segs=8)

        def to_lonlat(coords: Any) -> Any:
            out = coords.copy()
            out[:, 0] = coords[:, 0] / kx + lon0
            out[:, 1] = coords[:, 1] / m_per_deg + lat0
            return out

        return dict(mapping(shapely.transform(ground, to_lonlat)))

    def to_geojson(self) -> dict[str, Any]:
        """The route as a GeoJSON LineString (``[lon, lat(, alt)]``)."""
        coords = [[p[1], p[0], *p[2:]] for p in self.points]
        if len(coords) == 1:
            coords = coords * 2  # a LineString needs two positions
        return {"type": "LineString", "coordinates": coords}


def _alt(p: tuple[float, ...]) -> float | None:
    return p[2] if len(p) > 2 else None


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from the first point to the second, 0 to 360 degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360.0


def parse_route(obj: Any, source: str) -> Route:
    """A route from a GeoJSON LineString (or a Feature holding one).

    Raises InvalidRequestError naming ``source`` and what is wrong.
    """
    if isinstance(obj, dict) and obj.get("type") == "Feature":
        obj = obj.get("geometry")
    if not isinstance(obj, dict) or obj.get("type") != "LineString":
        raise InvalidRequestError(f"{source}: the route must be a GeoJSON LineString")
    coords = obj.get("coordinates")
    if not isinstance(coords, list) or not coords:
        raise InvalidRequestError(f"{source}: the route's LineString has no coordinates")
    if len(coords) > MAX_ROUTE_POINTS:
        raise InvalidRequestError(
            f"{source}: the route has {len(coords)} positions, more than {MAX_ROUTE_POINTS}"
        )
    points: list[tuple[float, ...]] = []
    for i, c in enumerate(coords):
        if (
            not isinstance(c, list)
            or len(c) not in (2, 3)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in c)
            or not all(math.isfinite(v) for v in c)
        ):
            raise InvalidRequestError(
                f"{source}: route position {i} must be [lon, lat] or [lon, lat, alt] numbers"
            )
        lon, lat = float(c[0]), float(c[1])
        if not (-MAX_LAT <= lat <= MAX_LAT and -180.0 <= lon <= 180.0):
            raise InvalidRequestError(f"{source}: route position {i} ({lat}, {lon}) is off the map")
        points.append((lat, lon, float(c[2])) if len(c) == 3 else (lat, lon))
    return Route(tuple(points))
