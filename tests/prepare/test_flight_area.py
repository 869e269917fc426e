"""A flight's area is what the flight is: each element buffered where it is, a far
element reported, the antimeridian checked on every element, distances bounded."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from pyproj import Geod

from takeoff_cache.errors import (
    AntimeridianError,
    InvalidRequestError,
    MalformedFlightError,
    TooManyTilesError,
)
from takeoff_cache.prepare import area as area_module
from takeoff_cache.prepare.area import FAR_M, MAX_DISTANCE_M, check_tile_budget, flight_area
from takeoff_cache.prepare.flight import Circle, Corridor, Flight, parse_flight_json
from takeoff_cache.prepare.report import PrepareReport
from takeoff_cache.prepare.sources import parse_flight
from takeoff_cache.tiles.area import Area, count_area_tiles, tiles_for_area
from takeoff_cache.tiles.mbtiles import MBTilesWriter

PLAN = Path(__file__).parents[1] / "data" / "flights" / "survey_corridor.plan"
GEOD = Geod(ellps="WGS84")


def plan_with_rally(*points: tuple[float, float]) -> Flight:
    doc: dict[str, Any] = json.loads(PLAN.read_text())
    doc["rallyPoints"] = {"version": 2, "points": [[lat, lon, 50.0] for lat, lon in points]}
    return parse_flight(json.dumps(doc).encode(), "survey_corridor.plan")


@pytest.mark.parametrize("far", [(-34.0, 151.0), (40.0, 10.0), (-20.0, -60.0)])
def test_a_far_rally_point_neither_shrinks_the_mission_nor_goes_unreported(
    far: tuple[float, float],
) -> None:
    alone = flight_area(plan_with_rally(), 500.0)
    with_far = flight_area(plan_with_rally(far), 500.0)
    mission = set(tiles_for_area(alone.geojson, (17,)))
    assert mission <= set(tiles_for_area(with_far.geojson, (17,)))
    # The rally point adds its own disc and nothing else.
    assert with_far.km2 == pytest.approx(alone.km2 + math.pi * 0.5**2, rel=0.002)
    assert alone.warnings == ()
    (warning,) = with_far.warnings
    assert f" at {far[0]:.5f},{far[1]:.5f} is " in warning and "km from the rest" in warning


def test_elements_within_the_threshold_are_not_reported() -> None:
    base = (-33.9, -70.6)  # southern and western hemispheres
    lon2, lat2, _ = GEOD.fwd(base[1], base[0], 90.0, FAR_M * 0.8)
    lon3, lat3, _ = GEOD.fwd(base[1], base[0], 90.0, FAR_M * 3)
    near = flight_area(Flight(None, "t", points=(base, (lat2, lon2))), 500.0)
    assert near.warnings == ()
    far = flight_area(Flight(None, "t", points=(base, (lat2, lon2), (lat3, lon3))), 500.0)
    assert len(far.warnings) == 1 and "point 3" in far.warnings[0]


@pytest.mark.parametrize(("lat", "lon"), [(-45.0, -170.0), (60.0, 100.0), (-10.0, -40.0)])
def test_a_long_corridor_keeps_its_width_far_from_its_middle(lat: float, lon: float) -> None:
    # 1,500 km: one projection about its middle would widen or thin its ends.
    lon2, lat2, _ = GEOD.fwd(lon, lat, 80.0, 1_500_000.0)
    flight = Flight(None, "t", corridors=(Corridor(((lat, lon), (lat2, lon2)), 200.0),))
    area = flight_area(flight, 400.0)
    half_km = 0.5
    assert area.km2 == pytest.approx(1500 * 2 * half_km + math.pi * half_km**2, rel=0.003)


def test_two_point_buffers_across_the_antimeridian_are_refused_like_one() -> None:
    with pytest.raises(AntimeridianError, match="point 1 at"):
        flight_area(Flight(None, "t", points=((-16.5, 179.999),)), 500.0)
    pair = Flight(None, "t", points=((-16.5, 179.999), (-16.5, -179.999)))
    with pytest.raises(AntimeridianError, match="crosses the antimeridian"):
        flight_area(pair, 500.0)
    # Each one clear of it: both drawn, far apart as they are.
    apart = flight_area(Flight(None, "t", points=((-16.5, 179.9), (-16.5, -179.9))), 500.0)
    assert apart.km2 == pytest.approx(2 * math.pi * 0.5**2, rel=0.003)


@pytest.mark.parametrize(
    "flight",
    [
        Flight(None, "t", circles=(Circle((-33.9, -70.6), 1e300),)),
        Flight(None, "t", circles=(Circle((-33.9, -70.6), MAX_DISTANCE_M * 1.01),)),
        Flight(None, "t", corridors=(Corridor(((1.0, 1.0), (1.1, 1.1)), math.inf),)),
    ],
)
def test_huge_radii_and_widths_are_malformed_flights(flight: Flight) -> None:
    with pytest.raises(MalformedFlightError, match="at most 1,000,000 m"):
        flight_area(flight, 500.0)


@pytest.mark.parametrize("buffer_m", [1e300, math.inf, math.nan, -1.0])
def test_a_buffer_out_of_range_is_refused(buffer_m: float) -> None:
    with pytest.raises(InvalidRequestError, match="buffer_m"):
        flight_area(Flight(None, "t", points=((10.0, 10.0),)), buffer_m)


def continent() -> Area:
    ring = ((35.0, -10.0), (35.0, 15.0), (55.0, 15.0), (55.0, -10.0))  # 2,000+ km a side
    return flight_area(Flight(None, "continent", polygons=(ring,)), 500.0)


def test_a_continent_is_refused_from_its_geometry_before_any_tile_is_listed() -> None:
    area = continent()
    started = time.perf_counter()
    with pytest.raises(
        TooManyTilesError, match=r"at least [\d,]+ tiles to fetch, more than max_tiles"
    ):
        check_tile_budget(area, (16, 17), 50_000, None)
    assert time.perf_counter() - started < 10  # a hang guard, not a timing


def test_what_the_exact_count_allows_is_never_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A corridor over a continent: its bbox holds millions of tiles, its area few.
    # Counted as an area too large to list would be (the bound is left to decide).
    monkeypatch.setattr(area_module, "LISTABLE_TILES", 0)
    lon2, lat2, _ = GEOD.fwd(-70.0, -40.0, 10.0, 400_000.0)
    corridor = Corridor(((-40.0, -70.0), (lat2, lon2)), 0.0)
    area = flight_area(Flight(None, "t", corridors=(corridor,)), 100.0)
    exact = count_area_tiles(area.geojson, (16,))
    assert exact == len(tiles_for_area(area.geojson, (16,)))
    check_tile_budget(area, (16,), exact, None)
    with pytest.raises(TooManyTilesError, match=f"at least {exact:,} tiles"):
        check_tile_budget(area, (16,), exact - 1, None)
    # Tiles the corpus holds are not to fetch: with one held, one less is enough.
    corpus = tmp_path / "tiles.mbtiles"
    z, x, y = tiles_for_area(area.geojson, (16,))[0]
    with MBTilesWriter(corpus, name="t", attribution="t") as writer:
        writer.put((z, x, y), b"\xff\xd8\xff" + bytes(200), "0" * 64, None, None, time.time())
    with sqlite3.connect(corpus) as db:
        assert db.execute("SELECT count(*) FROM tiles").fetchone() == (1,)
    check_tile_budget(area, (16,), exact - 1, corpus)


def test_the_prepare_report_prints_each_far_element_as_a_warning_line() -> None:
    area = flight_area(plan_with_rally((-34.0, 151.0)), 500.0)
    mission = {"km2": area.km2, "tiles": 1, "tiles_per_zoom": {"17": 1}, "warnings": area.warnings}
    report = PrepareReport(flight={"source": "plan"}, area=mission, corpus="c.mbtiles")
    (line,) = [line for line in report.text().splitlines() if line.startswith("warning:")]
    assert "at -34.00000,151.00000 is" in line and "from the rest of the flight" in line


def test_a_deeply_nested_flight_handed_over_as_a_value_is_malformed() -> None:
    value: list[object] = []
    deep = value
    for _ in range(100_000):
        deep.append([])
        deep = deep[0]  # type: ignore[assignment]
    with pytest.raises(MalformedFlightError, match="deeper than 64 levels"):
        parse_flight_json({"path": value}, "a flow parameter")
