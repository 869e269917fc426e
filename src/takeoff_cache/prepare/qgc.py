"""QGroundControl's flight formats: the ``.plan`` JSON file and ``QGC WPL`` waypoints.

A plan names more than the path: survey and structure-scan polygons, corridor
scans (a polyline and its width), landing patterns, geofence inclusion polygons
and circles, rally points and the planned home. Items QGroundControl writes
without a place (null or NaN coordinates, 0,0, local or mission frames,
commands that carry no position) are skipped, as the vehicle would ignore them;
a coordinate off the globe is an error.
"""

from __future__ import annotations

import math
from typing import Any

from takeoff_cache.errors import FlightFileError, MalformedFlightError, NotAPlanError
from takeoff_cache.prepare.flight import (
    Circle,
    Corridor,
    Flight,
    LatLon,
    Position,
    checked,
    is_number,
    position,
)

# MAV_CMDs whose params 5-7 are where the vehicle goes (the flown path).
_FLOWN_COMMANDS = frozenset(
    {
        16,  # NAV_WAYPOINT
        17,  # NAV_LOITER_UNLIM
        18,  # NAV_LOITER_TURNS
        19,  # NAV_LOITER_TIME
        21,  # NAV_LAND
        22,  # NAV_TAKEOFF
        31,  # NAV_LOITER_TO_ALT
        82,  # NAV_SPLINE_WAYPOINT
        84,  # NAV_VTOL_TAKEOFF
        85,  # NAV_VTOL_LAND
        94,  # NAV_PAYLOAD_PLACE
        189,  # DO_LAND_START
        192,  # DO_REPOSITION
    }
)
# MAV_CMDs that name a place the vehicle looks at or may go to, not a path vertex.
_POINT_COMMANDS = frozenset({80, 179, 195, 201})  # NAV_ROI, DO_SET_HOME, DO_SET_ROI(_LOCATION)
# MAV_FRAMEs whose x/y are latitude/longitude; local and mission frames are not.
_GLOBAL_FRAMES = frozenset({0, 3, 5, 6, 10, 11})


def parse_plan(obj: dict[str, Any], source: str) -> Flight:
    """A flight from a parsed ``.plan`` (``"fileType": "Plan"``)."""
    mission = obj.get("mission")
    if not isinstance(mission, dict) or not isinstance(mission.get("items", []), list):
        raise MalformedFlightError(f"flight: {source}: a plan's 'mission' must hold a list 'items'")
    acc = _Acc(source)
    for i, item in enumerate(mission.get("items", [])):
        acc.item(item, f"mission item {i + 1}")
    fence = obj.get("geoFence")
    if isinstance(fence, dict):
        for i, entry in enumerate(_list(fence.get("polygons"))):
            # Exclusion zones are places not to fly: they add nothing to the area.
            if isinstance(entry, dict) and entry.get("inclusion", True):
                acc.polygon(entry.get("polygon"), f"geofence polygon {i + 1}")
        for i, entry in enumerate(_list(fence.get("circles"))):
            if isinstance(entry, dict) and entry.get("inclusion", True):
                circle = entry.get("circle")
                if isinstance(circle, dict):
                    acc.circle(circle.get("center"), circle.get("radius"), f"geofence circle {i}")
    rally = obj.get("rallyPoints")
    if isinstance(rally, dict):
        for i, point in enumerate(_list(rally.get("points"))):
            acc.point(point, f"rally point {i + 1}")
    home = acc.coordinate(mission.get("plannedHomePosition"), "plannedHomePosition")
    return acc.flight(home)


class _Acc:
    """What a plan adds up to, item by item."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.positions: list[Position] = []
        self.corridors: list[Corridor] = []
        self.polygons: list[tuple[LatLon, ...]] = []
        self.circles: list[Circle] = []
        self.points: list[Position] = []

    def coordinate(self, value: Any, where: str) -> Position | None:
        status, pos = position(value)
        if status == "range":
            raise MalformedFlightError(
                f"flight: {self.source}: {where}: {value!r:.60} is off the globe"
            )
        # null, NaN and 0,0 are how QGroundControl writes "no location": skipped.
        return pos

    def item(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            return
        if item.get("type") == "ComplexItem":
            self.complex(item, where)
            return
        command, frame = item.get("command"), item.get("frame")
        if not (isinstance(command, int) and isinstance(frame, int)):
            return
        if frame not in _GLOBAL_FRAMES:
            return
        params = item.get("params")
        value: Any = item.get("coordinate")
        if isinstance(params, list) and len(params) == 7:
            value = params[4:7]
        if command in _FLOWN_COMMANDS:
            pos = self.coordinate(value, where)
            if pos is not None:
                self.positions.append(pos)
        elif command in _POINT_COMMANDS:
            self.point(value, where)

    def complex(self, item: dict[str, Any], where: str) -> None:
        kind = item.get("complexItemType", "complex item")
        where = f"{where} ({kind})"
        # Landing patterns fly from the approach (or loiter) point down to the land point.
        approach = item.get("landingApproachCoordinate", item.get("loiterCoordinate"))
        for key, value in (("approach", approach), ("land", item.get("landCoordinate"))):
            pos = self.coordinate(value, f"{where} {key}")
            if pos is not None:
                self.positions.append(pos)
        if approach is not None and is_number(item.get("loiterRadius")):
            self.circle(approach, item["loiterRadius"], f"{where} loiter")
        transect = item.get("TransectStyleComplexItem")
        if isinstance(transect, dict):
            for i, sub in enumerate(_list(transect.get("Items"))):
                self.item(sub, f"{where} item {i + 1}")
        if "polygon" in item:
            self.polygon(item.get("polygon"), where)
        if "polyline" in item:
            width = item.get("CorridorWidth", 0.0)
            line = [p for p in map(self._latlon(where), _list(item.get("polyline"))) if p]
            if len(line) >= 2:
                w = float(width) if is_number(width) and width > 0 else 0.0
                self.corridors.append(Corridor(tuple(line), w))
            elif line:
                self.points.append(line[0])

    def polygon(self, value: Any, where: str) -> None:
        ring = [p for p in map(self._latlon(where), _list(value)) if p]
        if len(ring) >= 3:
            self.polygons.append(tuple(ring))
        else:
            self.points.extend(ring)  # a polygon still being drawn still names its places

    def circle(self, center: Any, radius: Any, where: str) -> None:
        pos = self.coordinate(center, where)
        if pos is not None and is_number(radius) and math.isfinite(radius) and radius > 0:
            self.circles.append(Circle((pos[0], pos[1]), float(radius)))
        elif pos is not None:
            self.points.append(pos)

    def point(self, value: Any, where: str) -> None:
        pos = self.coordinate(value, where)
        if pos is not None:
            self.points.append(pos)

    def _latlon(self, where: str) -> Any:
        def one(value: Any) -> LatLon | None:
            pos = self.coordinate(value, where)
            return None if pos is None else (pos[0], pos[1])

        return one

    def flight(self, home: Position | None, fid: str | None = None) -> Flight:
        return checked(
            Flight(
                id=fid,
                source=self.source,
                positions=tuple(self.positions),
                corridors=tuple(self.corridors),
                polygons=tuple(self.polygons),
                circles=tuple(self.circles),
                points=tuple(self.points),
                planned_home=home,
            )
        )


# --------------------------------------------------------------------------- WPL


def parse_wpl(text: str, source: str) -> Flight:
    """A flight from the text of a ``QGC WPL`` file, header first."""
    lines = text.splitlines()
    header = lines[0].split()
    if len(header) != 3 or header[2] not in ("110", "120"):
        raise NotAPlanError(
            f"flight: {source}: {lines[0].strip()!r} is not a supported waypoint file"
            " (QGC WPL 110 or 120)"
        )
    acc = _Acc(source)
    home: Position | None = None
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        # Tabs by the format; some tools write spaces, which read the same.
        cols = line.split()
        try:
            if len(cols) != 12:
                raise ValueError(f"{len(cols)} columns, expected 12")
            seq, _current, frame, command = (int(c) for c in cols[:4])
            lat, lon, alt = (float(c) for c in cols[8:11])
        except ValueError as exc:
            raise FlightFileError(f"flight: {source} line {number}: {exc}") from None
        # ArduPilot's convention: item 0 is the home position, absolute frame.
        if seq == 0 and command == 16 and frame == 0:
            home = acc.coordinate([lat, lon, alt], f"line {number}")
            continue
        params = [0.0, 0.0, 0.0, 0.0, lat, lon, alt]
        acc.item({"command": command, "frame": frame, "params": params}, f"line {number}")
    return acc.flight(home)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
