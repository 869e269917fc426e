"""A flight's area: the union of the flown path (home first, as a line), the
corridors (each buffered by half its width), every polygon, circle and point the
flight names, all buffered by ``buffer_m`` metres.

Each element is buffered where it is: in an azimuthal equidistant projection
centred near that element (long lines in pieces of at most :data:`_PIECE_M`),
where a metre is a metre in every direction. One projection for the whole
flight put a far rally point's distortion into the mission's buffer: 20% of it,
and 11 of 185 tiles, were lost. Each buffer goes back to WGS84 densified (no edge
longer than 200 m before reprojection), is checked against the antimeridian on
its own, and the pieces are joined in WGS84.

An element more than :data:`FAR_M` from every other is kept, but reported: a
stray rally point or a typo in a coordinate grows the download by its own area.
"""

from __future__ import annotations

import functools
import itertools
import math
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import shapely
from numpy.typing import NDArray
from pyproj import CRS, Geod, Transformer
from shapely.errors import GEOSException
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry

from takeoff_cache.core.tilemath import haversine_m, tile_range, tms_row
from takeoff_cache.errors import (
    AntimeridianError,
    CorpusError,
    InvalidRequestError,
    MalformedFlightError,
    TooManyTilesError,
)
from takeoff_cache.prepare.flight import Flight, LatLon
from takeoff_cache.tiles.area import (
    DEFAULT_BUFFER_M,
    Area,
    area_of,
    check_antimeridian,
    count_area_tiles,
    tile_count_bounds,
)

MAX_DISTANCE_M = 1_000_000.0  # a buffer, a radius or half a corridor's width
FAR_M = 50_000.0  # an element farther than this from every other is reported
# Above this many tiles (an upper bound from the geometry), the area's tiles are
# counted before they are listed, against --max-tiles.
LISTABLE_TILES = 200_000
_QUAD_SEGS = 16  # a buffered point is a 64-gon: 0.16% short of the circle's area
_DENSIFY_M = 200.0
# Lines are buffered in pieces of this length, each in a projection about its own
# middle: 25 km from the centre, aeqd's scale is off by less than 3e-6.
_PIECE_M = 50_000.0
_CENTRE_STEP = 0.25  # degrees: elements close together share one projection
_GEOD = Geod(ellps="WGS84")


@dataclass(frozen=True)
class _Element:
    """One thing a flight names, to be buffered by ``radius_m`` metres."""

    name: str
    kind: str  # "line", "polygon" or "point"
    coords: tuple[LatLon, ...]
    radius_m: float


def flight_area(flight: Flight, buffer_m: float = DEFAULT_BUFFER_M) -> Area:
    """The flight's area, every part of it buffered by ``buffer_m`` metres.

    ``Area.warnings`` names the elements more than :data:`FAR_M` from the rest.
    """
    if not (math.isfinite(buffer_m) and 0 <= buffer_m <= MAX_DISTANCE_M):
        raise InvalidRequestError(
            f"buffer_m: {buffer_m} must be a number of metres in [0, {MAX_DISTANCE_M:,.0f}]"
        )
    elements = list(_elements(flight, buffer_m))
    try:
        pieces = list(_buffered(elements, flight.source))
        merged = shapely.union_all([p for p in pieces if not p.is_empty])
    except GEOSException as exc:  # the limits above keep GEOS in range; this is the backstop
        raise MalformedFlightError(
            f"flight: {flight.source}: its area cannot be drawn: {exc}"
        ) from None
    if merged.is_empty or merged.area == 0:
        raise InvalidRequestError(
            f"area: the flight {flight.source} encloses no area with buffer_m {buffer_m:g};"
            " give a buffer above 0"
        )
    area = area_of(merged, flight.source)
    return replace(area, warnings=tuple(_far_elements(elements)))


def check_tile_budget(
    area: Area, zoom_levels: Iterable[int], max_tiles: int, corpus: Path | None
) -> None:
    """Refuse an area with more than ``max_tiles`` tiles to fetch before any tile is listed.

    Bounds from the geometry decide first (:func:`tiles.area.tile_count_bounds`,
    milliseconds and kilobytes even for a continent). Tiles the corpus already
    holds in the area's bbox are subtracted, so nothing the exact count would
    allow is refused. A job whose upper bound is listable is left to the exact
    check after listing, which names its exact count.
    """
    zooms = tuple(sorted(set(zoom_levels)))
    lower, upper = tile_count_bounds(area.geojson, zooms)
    if upper <= max(max_tiles, LISTABLE_TILES):
        return
    held = _held_tiles(corpus, area.bbox, zooms) if corpus is not None else 0
    at_least = lower - held
    if at_least <= max_tiles:
        at_least = count_area_tiles(area.geojson, zooms) - held
    if at_least > max_tiles:
        raise TooManyTilesError(
            f"download: at least {at_least:,} tiles to fetch, more than max_tiles"
            f" {max_tiles:,}; narrow the area (--buffer-m) or the zoom levels, or raise"
            " --max-tiles"
        )


# --------------------------------------------------------------------------- elements


def _elements(flight: Flight, buffer_m: float) -> Iterator[_Element]:
    home = () if flight.planned_home is None else (flight.planned_home,)
    path = tuple((p[0], p[1]) for p in (*home, *flight.positions))
    if len(path) >= 2:
        yield _Element("the flown path", "line", path, buffer_m)
    elif path:
        yield _Element(f"the planned home {_at(path[0])}", "point", path, buffer_m)
    for i, corridor in enumerate(flight.corridors, 1):
        name = f"corridor {i} {_at(corridor.line[0])}"
        yield _Element(
            name, "line", corridor.line, _radius(flight, name, corridor.width_m / 2, buffer_m)
        )
    for i, ring in enumerate(flight.polygons, 1):
        yield _Element(f"polygon {i} {_at(ring[0])}", "polygon", ring, buffer_m)
    for i, circle in enumerate(flight.circles, 1):
        name = f"circle {i} {_at(circle.center)}"
        yield _Element(
            name, "point", (circle.center,), _radius(flight, name, circle.radius_m, buffer_m)
        )
    for i, point in enumerate(flight.points, 1):
        latlon = (point[0], point[1])
        yield _Element(f"point {i} {_at(latlon)}", "point", (latlon,), buffer_m)


def _at(p: LatLon) -> str:
    return f"at {p[0]:.5f},{p[1]:.5f}"


def _radius(flight: Flight, name: str, own_m: float, buffer_m: float) -> float:
    if not (math.isfinite(own_m) and 0 <= own_m <= MAX_DISTANCE_M):
        raise MalformedFlightError(
            f"flight: {flight.source}: {name} reaches {own_m:g} m from its line or centre;"
            f" at most {MAX_DISTANCE_M:,.0f} m"
        )
    return own_m + buffer_m


def _buffered(elements: list[_Element], source: str) -> Iterator[BaseGeometry]:
    """The elements' buffers in WGS84: each drawn in a projection centred near it, those
    sharing a projection joined there and brought back together."""
    groups: dict[tuple[float, float], list[tuple[_Element, tuple[LatLon, ...]]]] = {}
    for element in elements:
        chunks = _pieces(element.coords) if element.kind == "line" else (element.coords,)
        for chunk in chunks:
            groups.setdefault(_middle(chunk), []).append((element, chunk))
    for centre, members in groups.items():
        piece = _drawn(centre, members)
        if _crosses_antimeridian(piece):
            for element, chunk in members:  # name the element that does
                check_antimeridian(
                    _drawn(centre, [(element, chunk)]), f"the area of {element.name} of {source}"
                )
            check_antimeridian(piece, f"the area of {source}")
        yield piece


def _drawn(
    centre: tuple[float, float], members: list[tuple[_Element, tuple[LatLon, ...]]]
) -> BaseGeometry:
    """``members`` buffered in the projection about ``centre``, joined, back in WGS84."""
    forward, back = _projection(*centre)
    lats = [p[0] for _, chunk in members for p in chunk]
    lons = [p[1] for _, chunk in members for p in chunk]
    xs, ys = forward.transform(lons, lats)
    xy = np.column_stack([np.atleast_1d(xs), np.atleast_1d(ys)])
    local: list[BaseGeometry] = []
    at = 0
    for element, chunk in members:
        coords = xy[at : at + len(chunk)]
        at += len(chunk)
        shape: BaseGeometry
        if element.kind == "line":
            shape = LineString(coords)
        elif element.kind == "polygon":
            shape = shapely.make_valid(Polygon(coords))  # a hand-drawn ring may cross itself
        else:
            shape = Point(coords[0])
        local.append(shape.buffer(element.radius_m, quad_segs=_QUAD_SEGS))
    dense = shapely.segmentize(shapely.union_all(local), _DENSIFY_M)

    def to_lonlat(coords: NDArray[np.float64]) -> NDArray[np.float64]:
        lons, lats = back.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([lons, lats])

    return shapely.transform(dense, to_lonlat)


def _crosses_antimeridian(geometry: BaseGeometry) -> bool:
    try:
        check_antimeridian(geometry, "")
    except AntimeridianError:
        return True
    return False


def _pieces(line: tuple[LatLon, ...]) -> Iterator[tuple[LatLon, ...]]:
    """The line cut into consecutive pieces of at most about :data:`_PIECE_M`; a leg
    longer than that is split at even steps along its geodesic."""
    piece: list[LatLon] = [line[0]]
    length = 0.0
    for a, b in itertools.pairwise(line):
        leg = haversine_m(a[0], a[1], b[0], b[1])
        steps = max(1, math.ceil(leg / _PIECE_M))
        between = _GEOD.npts(a[1], a[0], b[1], b[0], steps - 1) if steps > 1 else []
        for p in (*((lat, lon) for lon, lat in between), b):
            piece.append(p)
            length += leg / steps
            if length >= _PIECE_M:
                yield tuple(piece)
                piece, length = [p], 0.0
    if len(piece) >= 2:
        yield tuple(piece)


def _middle(chunk: tuple[LatLon, ...]) -> tuple[float, float]:
    lats = [p[0] for p in chunk]
    lons = [p[1] for p in chunk]
    lat0, lon0 = (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
    # Snapped, so that elements close together share a projection (made once).
    return round(lat0 / _CENTRE_STEP) * _CENTRE_STEP, round(lon0 / _CENTRE_STEP) * _CENTRE_STEP


@functools.lru_cache(maxsize=256)
def _projection(lat0: float, lon0: float) -> tuple[Transformer, Transformer]:
    local = CRS.from_proj4(f"+proj=aeqd +lat_0={lat0} +lon_0={lon0} +datum=WGS84 +units=m")
    return (
        Transformer.from_crs("EPSG:4326", local, always_xy=True),
        Transformer.from_crs(local, "EPSG:4326", always_xy=True),
    )


def _far_elements(elements: list[_Element]) -> Iterator[str]:
    """A warning for each element not within :data:`FAR_M` of the largest group of them.

    Each element is a disc (its extent's middle; the distance to its farthest vertex
    plus its buffer). Discs whose middles share a cell of :data:`_CELL_DEG` are near
    each other by construction, so each cell becomes one disc holding them, and the
    groups are found among cells: a plan of thousands of points costs what its
    handful of cells do. Gaps between discs understate the real gaps.
    """
    if len(elements) < 2:
        return
    centres = np.empty((len(elements), 2))
    reach = np.empty(len(elements))
    for i, e in enumerate(elements):
        lats = [p[0] for p in e.coords]
        lons = [p[1] for p in e.coords]
        lat0, lon0 = (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
        centres[i] = lat0, lon0
        reach[i] = max(haversine_m(lat0, lon0, p[0], p[1]) for p in e.coords) + e.radius_m
    keys = np.floor(centres / _CELL_DEG).astype(np.int64)
    cells, cell_of = np.unique(keys, axis=0, return_inverse=True)
    cell_of = cell_of.reshape(-1)
    if len(cells) > _MAX_CELLS:
        return  # scattered beyond reason: the tile budget speaks for it
    middle: NDArray[np.float64] = ((cells + 0.5) * _CELL_DEG).astype(np.float64)
    cell_reach = np.zeros(len(cells))
    np.maximum.at(cell_reach, cell_of, _metres(centres, middle[cell_of]) + reach)
    gap = _pairwise_metres(middle) - cell_reach[:, None] - cell_reach[None, :]
    group = _components(gap <= FAR_M)
    sizes = np.bincount(group[cell_of])
    main = int(np.argmax(sizes))  # the group of most elements; ties: the first seen
    main_cells = np.flatnonzero(group == main)
    for i, e in enumerate(elements):
        if group[cell_of[i]] != main:
            gaps = _metres(centres[i][None, :], middle[main_cells]) - reach[i]
            km = max(0.0, float(np.min(gaps - cell_reach[main_cells]))) / 1000
            yield (
                f"area: {e.name} is {km:,.0f} km from the rest of the flight (more than"
                f" {FAR_M / 1000:.0f} km); its tiles are included, check the plan"
            )


_CELL_DEG = 0.1  # at most 16 km across: well within FAR_M
_MAX_CELLS = 4000
_EARTH_M = 6_371_008.8


def _metres(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Great-circle metres between rows of ``[lat, lon]`` degrees (broadcast)."""
    lat1, lon1 = np.radians(a[..., 0]), np.radians(a[..., 1])
    lat2, lon2 = np.radians(b[..., 0]), np.radians(b[..., 1])
    h = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    )
    return np.asarray(2 * _EARTH_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _pairwise_metres(points: NDArray[np.float64]) -> NDArray[np.float64]:
    return _metres(points[:, None, :], points[None, :, :])


def _components(near: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Each node's group in the graph ``near`` (symmetric), by breadth-first sweeps."""
    group = np.full(len(near), -1, dtype=np.int64)
    for start in range(len(near)):
        if group[start] >= 0:
            continue
        members = np.zeros(len(near), dtype=bool)
        frontier = members.copy()
        frontier[start] = members[start] = True
        while frontier.any():
            frontier = near[frontier].any(axis=0) & ~members
            members |= frontier
        group[members] = start
    return group


# --------------------------------------------------------------------------- corpus


def _held_tiles(
    corpus: Path, bbox: tuple[float, float, float, float], zooms: tuple[int, ...]
) -> int:
    """How many tiles an MBTiles corpus holds in ``bbox`` at ``zooms`` (index ranges
    only, no tile read); 0 without a file."""
    if not corpus.is_file():
        return 0
    try:
        db = sqlite3.connect(f"file:{corpus}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CorpusError(f"corpus: cannot open {corpus}: {exc}") from exc
    try:
        total = 0
        for z in zooms:
            x0, x1, y0, y1 = tile_range(bbox, z)
            (count,) = db.execute(
                "SELECT count(*) FROM tiles WHERE zoom_level = ?"
                " AND tile_column BETWEEN ? AND ? AND tile_row BETWEEN ? AND ?",
                (z, x0, x1, tms_row(z, y1), tms_row(z, y0)),
            ).fetchone()
            total += int(count)
        return total
    except sqlite3.DatabaseError as exc:
        raise CorpusError(f"corpus: {corpus} is not a readable MBTiles file: {exc}") from exc
    finally:
        db.close()
