"""The mission area in metres at any latitude, and the tiles it needs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import Geod
from shapely.geometry import box, shape

from takeoff_cache.core.tilemath import lonlat_to_fractional_tile, tile_bounds, tile_range
from takeoff_cache.errors import AntimeridianError, InvalidRequestError
from takeoff_cache.prepare.area import flight_area
from takeoff_cache.prepare.flight import Circle, Corridor, Flight
from takeoff_cache.prepare.sources import load_flight
from takeoff_cache.tiles.area import (
    area_spans,
    count_area_tiles,
    load_area,
    parse_area,
    tile_count_bounds,
    tiles_for_area,
)

DATA = Path(__file__).parents[1] / "data" / "flights"
GEOD = Geod(ellps="WGS84")
# High and low latitudes, all four hemispheres.
PLACES = [(0.1, 0.1), (48.45, 35.04), (-33.9, -70.6), (64.1, -21.9), (78.2, 15.6), (-77.8, 166.7)]


def line_east(lat: float, lon: float, km: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Two points ``km`` apart along a geodesic heading north-east."""
    lon2, lat2, _ = GEOD.fwd(lon, lat, 45.0, km * 1000.0)
    return (lat, lon), (lat2, lon2)


@pytest.mark.parametrize(("lat", "lon"), PLACES)
def test_a_buffered_point_is_a_disc_of_pi_r_squared(lat: float, lon: float) -> None:
    area = flight_area(Flight(None, "t", points=((lat, lon),)), buffer_m=500.0)
    assert area.geojson["type"] == "Polygon"
    assert area.km2 == pytest.approx(math.pi * 0.5**2, rel=0.003)
    # Round in metres, whatever a degree of longitude is here.
    ring = area.geojson["coordinates"][0]
    for p_lon, p_lat in ring[:-1]:
        _, _, metres = GEOD.inv(lon, lat, p_lon, p_lat)
        assert metres == pytest.approx(500.0, rel=0.002)


@pytest.mark.parametrize(("lat", "lon"), PLACES)
def test_a_buffered_corridor_is_its_length_times_its_width(lat: float, lon: float) -> None:
    a, b = line_east(lat, lon, 20.0)
    flight = Flight(None, "t", corridors=(Corridor((a, b), 100.0),))
    area = flight_area(flight, buffer_m=500.0)
    half = 0.05 + 0.5
    assert area.km2 == pytest.approx(20.0 * 2 * half + math.pi * half**2, rel=0.005)


def test_polygons_circles_and_path_add_up() -> None:
    ring = ((48.40, 35.00), (48.40, 35.02), (48.42, 35.02), (48.42, 35.00))
    signed, perimeter = GEOD.polygon_area_perimeter([p[1] for p in ring], [p[0] for p in ring])
    polygon_km2 = abs(signed) / 1e6
    circle = Circle((48.50, 35.20), 300.0)
    area = flight_area(Flight(None, "t", polygons=(ring,), circles=(circle,)), buffer_m=100.0)
    assert area.geojson["type"] == "MultiPolygon"  # two places 20 km apart
    assert area.km2 == pytest.approx(
        polygon_km2 + perimeter / 1000 * 0.1 + math.pi * 0.1**2 + math.pi * 0.4**2, rel=0.01
    )


def test_the_path_starts_at_home() -> None:
    flight = Flight(None, "t", positions=((48.46, 35.04),), planned_home=(48.45, 35.04, 100.0))
    area = flight_area(flight, buffer_m=50.0)
    length_km = GEOD.inv(35.04, 48.45, 35.04, 48.46)[2] / 1000
    assert area.km2 == pytest.approx(length_km * 0.1 + math.pi * 0.05**2, rel=0.01)


def test_the_area_is_canonical_geojson() -> None:
    flight = load_flight(DATA / "survey_corridor.plan")
    area = flight_area(flight)
    assert area == flight_area(flight)
    json.dumps(area.geojson)  # plain lists and floats
    geom = shape(area.geojson)
    assert geom.is_valid
    for polygon in getattr(geom, "geoms", [geom]):
        assert polygon.exterior.is_ccw  # RFC 7946
    lat_min, _, _, lon_max = area.bbox
    assert lat_min < 48.43 and lon_max > 35.103


def test_no_buffer_around_a_path_is_refused() -> None:
    flight = Flight(None, "t", positions=((48.45, 35.04), (48.46, 35.05)))
    with pytest.raises(InvalidRequestError, match="encloses no area"):
        flight_area(flight, buffer_m=0.0)
    with pytest.raises(InvalidRequestError, match="buffer_m"):
        flight_area(flight, buffer_m=-5.0)


def test_an_area_reaching_over_the_antimeridian_is_refused() -> None:
    with pytest.raises(AntimeridianError, match="antimeridian"):
        flight_area(Flight(None, "t", points=((-16.5, 179.998),)), buffer_m=500.0)


# --------------------------------------------------------------------------- tiles


def _brute_force(area: dict[str, object], z: int) -> list[tuple[int, int, int]]:
    """Every tile of the bbox whose square shares area with the area, in tile space."""
    n = 2**z

    def to_tiles(coords: np.ndarray) -> np.ndarray:
        # tilemath's own scalar formula, point by point: independent of area.py's.
        return np.array([lonlat_to_fractional_tile(lat, lon, z) for lon, lat in coords])

    geom = shapely.transform(shape(area), to_tiles)
    x0, y0, x1, y1 = geom.bounds
    found = []
    for x in range(max(0, math.floor(x0)), min(n, math.ceil(x1))):
        for y in range(max(0, math.floor(y0)), min(n, math.ceil(y1))):
            if geom.intersection(box(x, y, x + 1, y + 1)).area > 1e-9:
                found.append((z, x, y))
    return found


@pytest.mark.parametrize(("lat", "lon"), PLACES[:4])
def test_tiles_of_a_corridor_are_exactly_those_it_overlaps(lat: float, lon: float) -> None:
    a, b = line_east(lat, lon, 6.0)
    area = flight_area(Flight(None, "t", corridors=(Corridor((a, b), 60.0),)), buffer_m=150.0)
    for z in (14, 16):
        assert tiles_for_area(area.geojson, [z]) == _brute_force(area.geojson, z)


@pytest.mark.parametrize(("lat", "lon"), PLACES[:4])
def test_a_rectangle_area_selects_what_the_bbox_selects(lat: float, lon: float) -> None:
    bbox = (lat, lon, lat + 0.031, lon + 0.047)
    rect = {
        "type": "Polygon",
        "coordinates": [
            [
                [lon, lat],
                [lon + 0.047, lat],
                [lon + 0.047, lat + 0.031],
                [lon, lat + 0.031],
                [lon, lat],
            ]
        ],
    }
    for z in (12, 15, 17):
        x0, x1, y0, y1 = tile_range(bbox, z)
        expected = [(z, x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)]
        assert tiles_for_area(rect, [z]) == expected


def test_a_tile_area_selects_that_tile_alone() -> None:
    lat_min, lon_min, lat_max, lon_max = tile_bounds(16, 39_000, 22_000)
    square = {
        "type": "Polygon",
        "coordinates": [
            [
                [lon_min, lat_min],
                [lon_max, lat_min],
                [lon_max, lat_max],
                [lon_min, lat_max],
                [lon_min, lat_min],
            ]
        ],
    }
    assert tiles_for_area(square, [16]) == [(16, 39_000, 22_000)]
    assert tiles_for_area(square, [17, 16]) == [(16, 39_000, 22_000)] + [
        (17, x, y) for x in (78_000, 78_001) for y in (44_000, 44_001)
    ]


def test_a_corridor_needs_far_fewer_tiles_than_its_bbox() -> None:
    a, b = line_east(48.40, 35.00, 20.0)
    area = flight_area(Flight(None, "t", corridors=(Corridor((a, b), 100.0),)))
    tiles = tiles_for_area(area.geojson, [17])
    x0, x1, y0, y1 = tile_range(area.bbox, 17)
    bbox_tiles = (x1 - x0 + 1) * (y1 - y0 + 1)
    assert len(tiles) < bbox_tiles / 5
    assert len(set(tiles)) == len(tiles) and tiles == sorted(tiles)


# --------------------------------------------------------------------------- --area files


def _write(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps(obj))
    return path


SQUARE = [[[35.0, 48.4], [35.1, 48.4], [35.1, 48.5], [35.0, 48.5], [35.0, 48.4]]]


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "Polygon", "coordinates": SQUARE},
        {"type": "MultiPolygon", "coordinates": [SQUARE]},
        {
            "type": "Feature",
            "properties": {},
            "geometry": {"type": "Polygon", "coordinates": SQUARE},
        },
        {
            "type": "FeatureCollection",
            "features": [
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": SQUARE}}
            ],
        },
    ],
)
def test_an_area_file_reads_polygons_in_any_wrapper(tmp_path: Path, obj: object) -> None:
    area = load_area(_write(tmp_path, obj))
    assert area.geojson["type"] == "Polygon"
    assert area.km2 == pytest.approx(7.41 * 11.12, rel=0.01)
    assert area.bbox == pytest.approx((48.4, 35.0, 48.5, 35.1))


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"type": "Point", "coordinates": [35.0, 48.4]}, "'Point'; expected a Polygon"),
        ({"type": "LineString", "coordinates": [[35.0, 48.4], [35.1, 48.5]]}, "'LineString'"),
        (
            {
                "type": "Polygon",
                "coordinates": [[[48.4, 135.0], [48.5, 135.0], [48.5, 135.1], [48.4, 135.0]]],
            },
            "lat in",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]},
            "not valid: Self-intersection",
        ),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, "not rings|not valid"),
        (
            {
                "type": "Polygon",
                "coordinates": SQUARE,
                "crs": {"properties": {"name": "EPSG:3857"}},
            },
            "other than WGS84",
        ),
        ({"type": "FeatureCollection", "features": []}, "no features"),
        ([1, 2], "not a GeoJSON object"),
    ],
)
def test_bad_area_files_are_one_clear_input_error(tmp_path: Path, obj: object, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        load_area(_write(tmp_path, obj))


def test_a_missing_or_broken_area_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_area(tmp_path / "none.geojson")
    (tmp_path / "bad.geojson").write_text("{ nope")
    with pytest.raises(InvalidRequestError, match="is not valid JSON"):
        load_area(tmp_path / "bad.geojson")


def test_a_flight_area_reads_back_as_an_area_file(tmp_path: Path) -> None:
    area = flight_area(load_flight(DATA / "flight.json"))
    again = parse_area(json.loads(json.dumps(area.geojson)), "again")
    assert again == area


@pytest.mark.parametrize(("lat", "lon"), PLACES)
@pytest.mark.parametrize("quad_segs", [1, 16])
def test_tile_count_bounds_hold_the_exact_count(lat: float, lon: float, quad_segs: int) -> None:
    # Coarse and fine outlines, at every latitude band and hemisphere.
    for radius, zoom in ((0.003, 17), (0.05, 14), (0.4, 12)):
        geometry = shapely.Point(lon, lat).buffer(radius, quad_segs=quad_segs)
        area = parse_area(shapely.geometry.mapping(geometry), "t").geojson
        exact = len(tiles_for_area(area, (zoom, zoom + 1)))
        lower, upper = tile_count_bounds(area, (zoom, zoom + 1))
        assert lower <= exact <= upper
        assert count_area_tiles(area, (zoom, zoom + 1)) == exact


def test_tile_count_bounds_of_a_continent_are_close_and_cheap() -> None:
    ring = [[-10.0, 35.0], [15.0, 35.0], [15.0, 55.0], [-10.0, 55.0], [-10.0, 35.0]]
    area = parse_area({"type": "Polygon", "coordinates": [ring]}, "t").geojson
    lower, upper = tile_count_bounds(area, (17,))
    x0, x1, y0, y1 = tile_range((35.0, -10.0, 55.0, 15.0), 17)
    box_tiles = (x1 - x0 + 1) * (y1 - y0 + 1)
    assert lower <= box_tiles <= upper
    assert upper - lower < box_tiles / 1000


@pytest.mark.parametrize(("lat", "lon"), PLACES)
def test_area_spans_are_the_listed_tiles_row_by_row(lat: float, lon: float) -> None:
    # A ring with a hole: some rows hold two runs.
    disc = shapely.Point(lon, lat).buffer(0.02).difference(shapely.Point(lon, lat).buffer(0.008))
    area = parse_area(shapely.geometry.mapping(disc), "t").geojson
    spans = list(area_spans(area, (15, 16)))
    assert len(spans) < len(tiles_for_area(area, (15, 16)))
    listed = sorted((z, x, y) for z, y, first, last in spans for x in range(first, last + 1))
    assert listed == tiles_for_area(area, (15, 16))
    assert any(b[:2] == a[:2] for a, b in itertools.pairwise(spans))  # a row of two runs
