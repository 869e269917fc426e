"""Web Mercator slippy-map tile math (the `z/x/y` scheme of OSM and Google).

Rows count from the north (y = 0 at the top); MBTiles stores rows from the
south (TMS), so readers flip with :func:`tms_row`.
"""

from __future__ import annotations

import math

# Web Mercator is undefined at the poles; this is where the square world ends.
MAX_LAT = 85.0511287798066
# IUGG mean Earth radius: distances between nearby points, not survey geodesy.
EARTH_RADIUS_M = 6371008.8
# A millionth of a tile: far below any real bbox precision, far above float error.
_EDGE = 1e-6


def lonlat_to_fractional_tile(lat: float, lon: float, z: int) -> tuple[float, float]:
    """Return the fractional tile coordinates (x, y) of a point at zoom ``z``."""
    n = 2.0**z
    lat = max(-MAX_LAT, min(MAX_LAT, lat))
    x = (lon + 180.0) / 360.0 * n
    rad = math.radians(lat)
    y = (1.0 - math.asinh(math.tan(rad)) / math.pi) / 2.0 * n
    return x, y


def fractional_tile_to_latlon(x: float, y: float, z: int) -> tuple[float, float]:
    """Return ``(lat, lon)`` in degrees of fractional tile coordinates at zoom ``z``."""
    n = 2.0**z
    lon = x / n * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * y / n))))
    return lat, lon


def tile_center(z: int, x: int, y: int) -> tuple[float, float]:
    """Return ``(lat, lon)`` of a tile's centre (the Mercator centre, not the degrees midpoint)."""
    return fractional_tile_to_latlon(x + 0.5, y + 0.5, z)


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres on the mean Earth sphere."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2.0 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """Return ``(lat_min, lon_min, lat_max, lon_max)`` of a tile in degrees."""
    n = 2.0**z
    lon_min = x / n * 360.0 - 180.0
    lon_max = (x + 1) / n * 360.0 - 180.0
    lat_max = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / n))))
    lat_min = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * (y + 1) / n))))
    return lat_min, lon_min, lat_max, lon_max


def tile_range(bbox: tuple[float, float, float, float], z: int) -> tuple[int, int, int, int]:
    """Return inclusive ``(x_min, x_max, y_min, y_max)`` of the tiles that
    intersect ``bbox`` (lat_min, lon_min, lat_max, lon_max) at zoom ``z``.

    A tile that only touches the bbox along an edge is left out: it adds no
    area, and counting it would make the selection depend on rounding.
    """
    lat_min, lon_min, lat_max, lon_max = bbox
    last = 2**z - 1
    fx0, fy0 = lonlat_to_fractional_tile(lat_max, lon_min, z)
    fx1, fy1 = lonlat_to_fractional_tile(lat_min, lon_max, z)
    # Degrees → tile coordinates does not round-trip exactly (a tile's own north
    # edge comes back as y = 0.9999999999999998): snap within a hair of an edge.
    x_min = min(last, max(0, math.floor(fx0 + _EDGE)))
    y_min = min(last, max(0, math.floor(fy0 + _EDGE)))
    x_max = min(last, max(x_min, math.ceil(fx1 - _EDGE) - 1))
    y_max = min(last, max(y_min, math.ceil(fy1 - _EDGE) - 1))
    return x_min, x_max, y_min, y_max


def tms_row(z: int, row: int) -> int:
    """Flip a row between XYZ (north-origin) and TMS (south-origin); it is its own inverse."""
    return (1 << z) - 1 - row
