"""The build request: fields of SPEC §2 from a TOML file and/or flags, normalized once.

Values may come as TOML values (lists, numbers) or as flag strings
(``"48.44,35.02,48.47,35.07"``); both normalize to the same frozen
:class:`BuildRequest`. Every problem names its field.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from takeoff_cache.core.documents import (
    MAX_AREA_BYTES,
    MAX_REQUEST_BYTES,
    check_depth,
    load_json,
    load_toml,
    read_document,
)
from takeoff_cache.core.env import KEY_PASSPHRASE
from takeoff_cache.core.tilemath import MAX_LAT
from takeoff_cache.errors import InvalidRequestError, Problems
from takeoff_cache.tiles.geojson import bounds, geometries, read_geojson, recall, remember
from takeoff_cache.tiles.route import Route, parse_route

SECTOR_CLASSES = ("active_conflict", "stable_rear")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Field:
    """One request field of SPEC §2: its name (TOML key, flow parameter), flag and help."""

    name: str
    flag: str
    help: str
    path: bool = False
    # A switch: the flag alone means yes; it also takes yes/no (as the companion passes it).
    switch: bool = False


# The request's fields, once: the CLI's flags, the flows' parameters, the
# deployments and the docs are checked against this table (tests/test_request_fields.py).
REQUEST_FIELDS = (
    Field("corpus", "--corpus", "MBTiles file or XYZ folder", path=True),
    Field("bbox", "--bbox", "LAT_MIN,LON_MIN,LAT_MAX,LON_MAX in degrees"),
    Field("zoom_levels", "--zoom", "zoom levels, Z[,Z...]"),
    Field("sector_class", "--sector", "active_conflict | stable_rear"),
    Field("backbones", "--backbones", "backbones TOML", path=True),
    Field("precision", "--precision", "fp32 (default) | fp16 | int8"),
    Field("calibration", "--calibration", "INT8 calibration file", path=True),
    Field("cache_root", "--cache-root", "existing folder that receives the cache", path=True),
    Field(
        "key",
        "--key",
        f"Ed25519 private key (PEM); passphrase from {KEY_PASSPHRASE}",
        path=True,
    ),
    Field("trust", "--trust", "trust store: PEM file or folder of public keys", path=True),
    Field("takeoff_origin", "--takeoff-origin", "LAT,LON,ALT (altitude in metres)"),
    Field("flight_id", "--flight-id", "flight UUID"),
    # A path in TOML and on the command line, or an inline GeoJSON table in TOML.
    Field(
        "area",
        "--area",
        "mission area: GeoJSON Polygon/MultiPolygon (WGS84); selects its tiles, not the bbox's",
        path=True,
    ),
    # Like the area: a path, or an inline GeoJSON table in TOML; prepare fills it.
    Field(
        "route",
        "--route",
        "flight path: GeoJSON LineString (WGS84); readiness and the self-test follow it",
        path=True,
    ),
)
FIELDS = tuple(f.name for f in REQUEST_FIELDS)
PATH_FIELDS = tuple(f.name for f in REQUEST_FIELDS if f.path)
FLAGS = {f.name: f.flag for f in REQUEST_FIELDS}
# Web Mercator's latitude limit rounded as SPEC §2 states it.
LAT_LIMIT = round(MAX_LAT, 4)


@dataclass(frozen=True)
class Bbox:
    lat_min: float
    lon_min: float
    lat_max: float
    lon_max: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.lat_min, self.lon_min, self.lat_max, self.lon_max)


@dataclass(frozen=True)
class BuildRequest:
    corpus: Path
    bbox: Bbox
    zoom_levels: tuple[int, ...]
    sector_class: str
    backbones: Path
    precision: str
    calibration: Path | None
    cache_root: Path
    key: Path
    trust: Path
    takeoff_origin: tuple[float, float, float] | None
    flight_id: str | None
    # The area's normalized GeoJSON geometry (area.parse_area), never the file it came from.
    area: dict[str, Any] | None = None
    # The positions flown, in order (tiles/route.py), never the file they came from.
    route: Route | None = None

    def to_json(self) -> dict[str, Any]:
        """The request as recorded in the manifest (paths as given, resolved)."""
        out = asdict(self)
        out["bbox"] = list(self.bbox.as_tuple())
        out["zoom_levels"] = list(self.zoom_levels)
        out["takeoff_origin"] = list(self.takeoff_origin) if self.takeoff_origin else None
        for name in PATH_FIELDS:
            out[name] = str(out[name]) if out[name] is not None else None
        out["area"] = self.area
        out["route"] = self.route.to_geojson() if self.route is not None else None
        return out


def read_request_file(path: Path) -> dict[str, Any]:
    """Read a request TOML; relative paths in it are made relative to the file."""
    return read_request_sections(path, ())[0]


def read_request_sections(
    path: Path, tables: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A request TOML's fields, and the tables named in ``tables`` (``[companion]``)
    that a command reads beside them, as given."""
    data = read_document(path, MAX_REQUEST_BYTES, InvalidRequestError, "request")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"request: {path} is not valid TOML: {exc}") from None
    doc = load_toml(text, str(path), InvalidRequestError, "request")
    sections: dict[str, dict[str, Any]] = {}
    for name in tables:
        if name in doc:
            table = doc.pop(name)
            if not isinstance(table, dict):
                raise InvalidRequestError(f"request: {path}: [{name}] must be a table")
            sections[name] = table
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise InvalidRequestError(f"request: {path}: unknown field {unknown[0]!r}")
    base = path.resolve().parent
    for name in PATH_FIELDS:
        value = doc.get(name)
        if isinstance(value, str) and value:
            doc[name] = str(base / Path(value).expanduser())
    return doc, sections


def _numbers(field: str, value: Any, count: int) -> list[float]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise InvalidRequestError(
                f"{field}: expected {count} comma-separated numbers, got {value!r}"
            ) from None
    elif isinstance(value, list | tuple):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise InvalidRequestError(f"{field}: expected {count} numbers, got {value!r}")
        numbers = [float(v) for v in value]
    else:
        raise InvalidRequestError(f"{field}: expected {count} numbers, got {value!r}")
    if len(numbers) != count:
        raise InvalidRequestError(f"{field}: expected {count} numbers, got {len(numbers)}")
    if any(n != n or n in (float("inf"), float("-inf")) for n in numbers):
        raise InvalidRequestError(f"{field}: numbers must be finite")
    return numbers


def parse_bbox(value: Any) -> Bbox:
    lat_min, lon_min, lat_max, lon_max = _numbers("bbox", value, 4)
    for name, lat in (("lat_min", lat_min), ("lat_max", lat_max)):
        if not -LAT_LIMIT <= lat <= LAT_LIMIT:
            raise InvalidRequestError(
                f"bbox: {name} {lat} is outside [-{LAT_LIMIT}, {LAT_LIMIT}] (Web Mercator)"
            )
    for name, lon in (("lon_min", lon_min), ("lon_max", lon_max)):
        if not -180.0 <= lon <= 180.0:
            raise InvalidRequestError(f"bbox: {name} {lon} is outside [-180, 180]")
    if not lat_min < lat_max:
        raise InvalidRequestError(f"bbox: lat_min {lat_min} must be below lat_max {lat_max}")
    if not lon_min < lon_max:
        raise InvalidRequestError(f"bbox: lon_min {lon_min} must be below lon_max {lon_max}")
    return Bbox(lat_min, lon_min, lat_max, lon_max)


def parse_zoom_levels(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        items: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise InvalidRequestError(f"zoom_levels: expected a list of integers, got {value!r}")
    if not items:
        raise InvalidRequestError("zoom_levels: the list is empty; give at least one zoom level")
    zooms = []
    for item in items:
        try:
            z = int(item) if not isinstance(item, bool | float) else None
        except ValueError:
            z = None
        if z is None:
            raise InvalidRequestError(f"zoom_levels: {item!r} is not an integer")
        if not 0 <= z <= 22:
            raise InvalidRequestError(f"zoom_levels: {z} is outside [0, 22]")
        zooms.append(z)
    return tuple(sorted(set(zooms)))


def parse_origin(value: Any) -> tuple[float, float, float] | None:
    if value is None or value == "":
        return None
    lat, lon, alt = _numbers("takeoff_origin", value, 3)
    if not -90.0 <= lat <= 90.0:
        raise InvalidRequestError(f"takeoff_origin: latitude {lat} is outside [-90, 90]")
    if not -180.0 <= lon <= 180.0:
        raise InvalidRequestError(f"takeoff_origin: longitude {lon} is outside [-180, 180]")
    return (lat, lon, alt)


def _optional_path(field: str, value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | Path):
        raise InvalidRequestError(f"{field}: expected a path, got {value!r}")
    return Path(value).expanduser().resolve()


def _required_path(field: str, raw: dict[str, Any]) -> Path:
    path = _optional_path(field, raw.get(field))
    if path is None:
        raise InvalidRequestError(f"{field}: missing (give {FLAGS[field]})")
    return path


def parse_area_field(value: Any, remembered: Path | None = None) -> dict[str, Any] | None:
    """The ``area`` field: a GeoJSON file's path, or GeoJSON itself (a TOML table, a flow
    parameter, a manifest's record), normalized to the geometry the build hashes.

    ``remembered``: a work folder's record of areas already normalized (tiles/geojson.py);
    an area found there is not normalized again, so shapely, pyproj and numpy stay unloaded.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str | Path):
        path = Path(value).expanduser()
        obj, source = read_geojson(path), str(path)
    elif isinstance(value, dict):
        obj, source = value, "the request's inline table"
        check_depth(obj, source, InvalidRequestError, "area")
    else:
        raise InvalidRequestError(f"area: expected a GeoJSON file or object, got {value!r:.80}")
    found = geometries(obj, source)
    if remembered is not None and (area := recall(remembered, found)) is not None:
        return area
    from takeoff_cache.tiles.area import parse_area  # shapely, pyproj and numpy

    area = parse_area(obj, source).geojson
    if remembered is not None:
        remember(remembered, found, area)
    return area


def parse_route_field(value: Any) -> Route | None:
    """The ``route`` field: a GeoJSON LineString file's path, or the LineString itself
    (a TOML table, a flow parameter, a manifest's record)."""
    if value is None or value == "":
        return None
    if isinstance(value, Route):
        return value
    if isinstance(value, str | Path):
        path = Path(value).expanduser()
        data = read_document(path, MAX_AREA_BYTES, InvalidRequestError, "route")
        obj = load_json(data, str(path), InvalidRequestError, "route")
        return parse_route(obj, f"route: {path}")
    if isinstance(value, dict):
        check_depth(value, "the request's inline table", InvalidRequestError, "route")
        return parse_route(value, "route: the request's inline table")
    raise InvalidRequestError(f"route: expected a GeoJSON file or object, got {value!r:.80}")


def _area_bbox(area: dict[str, Any]) -> Bbox:
    lat_min, lon_min, lat_max, lon_max = bounds(area)
    # The area may reach Web Mercator's exact limit; SPEC §2's bbox stops at its rounding.
    return Bbox(max(lat_min, -LAT_LIMIT), lon_min, min(lat_max, LAT_LIMIT), lon_max)


def parse_request(raw: dict[str, Any], remembered_areas: Path | None = None) -> BuildRequest:
    """Normalize raw field values; nothing here touches the disk but path resolution and
    the area (its file, and ``remembered_areas``: see :func:`parse_area_field`).

    Every field is checked before anything is raised, so one error names every
    problem of the request, one line each (:class:`takeoff_cache.errors.Problems`).
    """
    problems = Problems()
    fields = parse_fields(raw, problems, remembered_areas)
    problems.raise_any()
    return BuildRequest(**fields)


def parse_fields(
    raw: dict[str, Any],
    problems: Problems,
    remembered_areas: Path | None = None,
    pending: Iterable[str] = (),
) -> dict[str, Any]:
    """The fields of ``raw`` normalized, each problem added to ``problems``.

    ``pending``: fields another step decides later (``prepare``'s flight decides the
    area, and its download the corpus); they are neither checked nor returned.
    What a problem left undecided is missing from the answer.
    """
    skip = frozenset(pending)
    out: dict[str, Any] = {}
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        problems.add(InvalidRequestError(f"request: unknown field {unknown[0]!r}"))

    def field(name: str, parse: Callable[[], Any]) -> None:
        if name not in skip:
            with problems.check():
                out[name] = parse()

    field("area", lambda: parse_area_field(raw.get("area"), remembered_areas))
    field("bbox", lambda: _bbox(raw.get("bbox"), out.get("area"), "area" in skip))
    field("zoom_levels", lambda: parse_zoom_levels(_given(raw, "zoom_levels", "Z[,Z...]")))
    field("sector_class", lambda: _choice("sector_class", raw.get("sector_class"), SECTOR_CLASSES))
    field("precision", lambda: _choice("precision", raw.get("precision") or "fp32", PRECISIONS))
    field("flight_id", lambda: _flight_id(raw.get("flight_id")))
    field("calibration", lambda: _optional_path("calibration", raw.get("calibration")))
    if out.get("precision") == "int8" and "calibration" in out and out["calibration"] is None:
        problems.add(
            InvalidRequestError(
                "precision: int8 needs --calibration (make one with 'takeoff-cache calibrate')"
            )
        )
    for name in ("corpus", "backbones", "cache_root", "key", "trust"):
        field(name, lambda name=name: _required_path(name, raw))  # type: ignore[misc]
    field("takeoff_origin", lambda: parse_origin(raw.get("takeoff_origin")))
    field("route", lambda: parse_route_field(raw.get("route")))
    return out


def _given(raw: dict[str, Any], name: str, form: str) -> Any:
    if raw.get(name) is None:
        raise InvalidRequestError(f"{name}: missing (give {FLAGS[name]} {form})")
    return raw[name]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidRequestError(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _flight_id(value: Any) -> str | None:
    if value in (None, ""):
        return None
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidRequestError(f"flight_id: {value!r} is not a UUID") from None


def _bbox(value: Any, area: dict[str, Any] | None, area_pending: bool) -> Bbox | None:
    """The bbox as given, else the area's; None only while the area is still to come."""
    if value is not None and value != "":
        return parse_bbox(value)
    if area is not None:
        return _area_bbox(area)
    if area_pending:
        return None
    raise InvalidRequestError(
        "bbox: missing (give --bbox LAT_MIN,LON_MIN,LAT_MAX,LON_MAX or --area FILE)"
    )
