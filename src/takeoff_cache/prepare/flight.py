"""A flight: what ``prepare`` resolves every source to, and the JSON flight format.

Every source (``takeoff_cache.prepare.sources``) becomes one :class:`Flight`:
the positions flown in order, the corridors, polygons, circles and points the
plan names, and the planned home. Files are told apart by content, not by name:

- a QGroundControl ``.plan`` (JSON with ``"fileType": "Plan"``);
- a ``QGC WPL 110`` / ``120`` waypoint file (Mission Planner, QGC's export);
- a JSON flight file, the same shape as the flights API's answer:

.. code-block:: json

    {
      "id": "6f1c2a8e-5d0b-4b9e-9a51-2f1d7c3e8b40",
      "planned_home": [48.4501, 35.0402, 120.0],
      "path": [[48.4510, 35.0420, 80.0], [48.4630, 35.0610, 80.0]],
      "corridors": [{"line": [[48.46, 35.06], [48.47, 35.09]], "width_m": 120.0}],
      "polygons": [[[48.44, 35.03], [48.44, 35.05], [48.45, 35.05]]],
      "circles": [{"center": [48.455, 35.045], "radius_m": 300.0}],
      "points": [[48.452, 35.047]]
    }

Coordinates are ``[lat, lon]`` or ``[lat, lon, alt]`` in WGS84 degrees (altitude in
metres), as QGroundControl writes them. Every key is optional, but at least one
position must be given; unknown keys are ignored. ``GET {URL}/flights/{id}`` answers
this object, with the bearer token from ``TAKEOFF_CACHE_FLIGHTS_TOKEN``.
See docs/flight.md for what is read from each format and what is skipped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from takeoff_cache.core.documents import check_depth
from takeoff_cache.errors import (
    AntimeridianError,
    MalformedFlightError,
    NoPositionError,
)

Position = tuple[float, float] | tuple[float, float, float]
LatLon = tuple[float, float]


@dataclass(frozen=True)
class Corridor:
    """A polyline flown with a swath ``width_m`` metres wide (a corridor scan)."""

    line: tuple[LatLon, ...]
    width_m: float


@dataclass(frozen=True)
class Circle:
    """A circle of ``radius_m`` metres around ``center`` (a fence, a loiter)."""

    center: LatLon
    radius_m: float


@dataclass(frozen=True)
class Flight:
    """A resolved flight. ``source`` says where it came from (a path or a URL)."""

    id: str | None
    source: str
    positions: tuple[Position, ...] = ()
    corridors: tuple[Corridor, ...] = ()
    polygons: tuple[tuple[LatLon, ...], ...] = ()
    circles: tuple[Circle, ...] = ()
    points: tuple[Position, ...] = ()
    planned_home: Position | None = None

    @property
    def takeoff_origin(self) -> Position:
        """The planned home, else the first position of any kind."""
        if self.planned_home is not None:
            return self.planned_home
        return next(_all_latlon(self))

    def to_json(self) -> dict[str, Any]:
        """The JSON flight shape (the module docstring's); :func:`parse_flight` reads it back."""
        out: dict[str, Any] = {"id": self.id}
        if self.planned_home is not None:
            out["planned_home"] = list(self.planned_home)
        out["path"] = [list(p) for p in self.positions]
        out["corridors"] = [
            {"line": [list(p) for p in c.line], "width_m": c.width_m} for c in self.corridors
        ]
        out["polygons"] = [[list(p) for p in ring] for ring in self.polygons]
        out["circles"] = [{"center": list(c.center), "radius_m": c.radius_m} for c in self.circles]
        out["points"] = [list(p) for p in self.points]
        return out


# --------------------------------------------------------------------------- JSON flight

FLIGHT_KEYS = frozenset({"path", "corridors", "polygons", "circles", "points", "planned_home"})


def parse_flight_json(obj: dict[str, Any], source: str, default_id: str | None = None) -> Flight:
    """A flight from the JSON flight shape; anything off is :class:`MalformedFlightError`.

    Machines write this shape, so unlike a hand-edited plan nothing is skipped.
    ``obj`` may come from a flow's parameters rather than a parsed file, so its
    nesting is checked here too.
    """
    check_depth(obj, source, MalformedFlightError, "flight")
    fid = obj.get("id", default_id)
    if fid is not None and not isinstance(fid, str):
        raise MalformedFlightError(f"flight: {source}: 'id' must be a string")

    def coords(key: str, value: Any, min_len: int = 0) -> tuple[Position, ...]:
        if not isinstance(value, list) or len(value) < min_len:
            raise MalformedFlightError(
                f"flight: {source}: '{key}' must be a list of at least {min_len} [lat, lon]"
            )
        return tuple(_strict(f"{key}[{i}]", v, source) for i, v in enumerate(value))

    def number(key: str, value: Any) -> float:
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise MalformedFlightError(f"flight: {source}: '{key}' must be a number >= 0")
        return float(value)

    def items(key: str) -> list[Any]:
        value = obj.get(key, [])
        if not isinstance(value, list):
            raise MalformedFlightError(f"flight: {source}: '{key}' must be a list")
        return value

    corridors = []
    for i, c in enumerate(items("corridors")):
        if not isinstance(c, dict):
            raise MalformedFlightError(f"flight: {source}: corridors[{i}] must be an object")
        line = coords(f"corridors[{i}].line", c.get("line"), 2)
        corridors.append(
            Corridor(_latlons(line), number(f"corridors[{i}].width_m", c.get("width_m")))
        )
    circles = []
    for i, c in enumerate(items("circles")):
        if not isinstance(c, dict):
            raise MalformedFlightError(f"flight: {source}: circles[{i}] must be an object")
        center = _strict(f"circles[{i}].center", c.get("center"), source)
        radius = number(f"circles[{i}].radius_m", c.get("radius_m"))
        circles.append(Circle((center[0], center[1]), radius))
    home = obj.get("planned_home")
    flight = Flight(
        id=fid,
        source=source,
        positions=coords("path", items("path")),
        corridors=tuple(corridors),
        polygons=tuple(
            _latlons(coords(f"polygons[{i}]", ring, 3)) for i, ring in enumerate(items("polygons"))
        ),
        circles=tuple(circles),
        points=coords("points", items("points")),
        planned_home=None if home is None else _strict("planned_home", home, source),
    )
    return checked(flight)


def _strict(key: str, value: Any, source: str) -> Position:
    status, pos = position(value)
    if status == "range":
        raise MalformedFlightError(f"flight: {source}: '{key}' {value!r:.60} is off the globe")
    if pos is None:
        raise MalformedFlightError(
            f"flight: {source}: '{key}' must be [lat, lon] or [lat, lon, alt] with lat in"
            f" [-90, 90], lon in [-180, 180], not 0,0; got {value!r:.60}"
        )
    return pos


# --------------------------------------------------------------------------- checks


def is_number(value: Any) -> bool:
    """An int or float that is not a bool (JSON's true is not 1 degree)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def position(value: Any) -> tuple[str, Position | None]:
    """``("ok", pos)``; ``("none", None)`` for no value, ``("skip", None)`` for NaN or
    0,0, ``("range", None)`` when off the globe."""
    if not isinstance(value, list | tuple) or len(value) not in (2, 3):
        return "none", None
    if not all(is_number(v) for v in value[:2]):
        return "none", None  # null, strings
    lat, lon = float(value[0]), float(value[1])
    if math.isnan(lat) or math.isnan(lon) or (lat == 0.0 and lon == 0.0):
        return "skip", None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return "range", None
    alt: Any = value[2] if len(value) == 3 else None
    if is_number(alt) and math.isfinite(alt):
        return "ok", (lat, lon, float(alt))
    return "ok", (lat, lon)


def _latlons(positions: Iterable[Position]) -> tuple[LatLon, ...]:
    return tuple((p[0], p[1]) for p in positions)


def _all_latlon(flight: Flight) -> Iterator[LatLon]:
    for p in flight.positions:
        yield p[0], p[1]
    for c in flight.corridors:
        yield from c.line
    for ring in flight.polygons:
        yield from ring
    for circle in flight.circles:
        yield circle.center
    for p in flight.points:
        yield p[0], p[1]
    if flight.planned_home is not None:
        yield flight.planned_home[0], flight.planned_home[1]


def checked(flight: Flight) -> Flight:
    """``flight`` itself once it names a place besides home and stays off the antimeridian."""
    # A home alone is where the vehicle stands, not a flight.
    if not (
        flight.positions or flight.corridors or flight.polygons or flight.circles or flight.points
    ):
        raise NoPositionError(
            f"flight: {flight.source} names no global position (every item lacks a location,"
            " uses a local frame or is at 0,0)"
        )
    # A segment whose longitudes differ by more than 180 degrees is the short way
    # round across the antimeridian: tile ranges and bboxes cannot express that.
    home = () if flight.planned_home is None else (flight.planned_home,)
    chains: list[tuple[LatLon, ...]] = [_latlons((*home, *flight.positions))]
    chains += [c.line for c in flight.corridors]
    chains += [(*ring, ring[0]) for ring in flight.polygons]
    for chain in chains:
        for a, b in itertools.pairwise(chain):
            if abs(a[1] - b[1]) > 180.0:
                raise AntimeridianError(
                    f"flight: {flight.source} crosses the antimeridian between"
                    f" {a[0]:.5f},{a[1]:.5f} and {b[0]:.5f},{b[1]:.5f}; split it into two flights"
                )
    return flight
