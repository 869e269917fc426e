"""The route: distances, sampling and parsing, in every hemisphere."""

from __future__ import annotations

import itertools
import math

import pytest

from takeoff_cache.core.tilemath import haversine_m
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.tiles.route import Route, bearing_deg, parse_route


@pytest.mark.parametrize("lat,lon", [(48.45, 35.04), (-34.6, -58.4), (-33.9, 18.4), (40.7, -74.0)])
def test_sampling_spaces_positions_evenly_and_ends_at_the_last(lat: float, lon: float) -> None:
    route = Route(((lat, lon, 80.0), (lat + 0.02, lon, 120.0), (lat + 0.02, lon + 0.03, 120.0)))
    points = list(route.sample(250.0))
    assert points[0].km == 0.0
    assert points[-1].km == pytest.approx(route.length_km)
    assert (points[-1].lat, points[-1].lon) == pytest.approx((lat + 0.02, lon + 0.03))
    gaps = [haversine_m(a.lat, a.lon, b.lat, b.lon) for a, b in itertools.pairwise(points)]
    assert max(gaps) <= 250.0 and min(gaps) > 150.0  # a corner cuts one chord short
    # Altitudes are interpolated: half-way up the first leg is half-way between 80 and 120.
    first_leg = [p for p in points if p.km <= route.cumulative_m[1] / 1000]
    mid = first_leg[len(first_leg) // 2]
    assert 80.0 < (mid.alt_m or 0) < 120.0
    assert points[1].heading_deg == pytest.approx(0.0, abs=0.5)  # north first
    assert points[-1].heading_deg == pytest.approx(90.0, abs=1.0)  # then east


def test_km_of_finds_where_along_the_route_a_place_is() -> None:
    route = Route(((-34.70, -58.50), (-34.60, -58.50)))
    total = route.length_km
    assert route.km_of(-34.65, -58.49) == pytest.approx(total / 2, rel=0.01)
    assert route.km_of(-34.80, -58.50) == 0.0  # before takeoff: the start
    assert route.km_of(-34.50, -58.50) == pytest.approx(total)


def test_a_single_position_is_a_route_of_length_zero() -> None:
    route = parse_route({"type": "LineString", "coordinates": [[18.4, -33.9]]}, "r")
    assert route.length_km == 0.0
    assert [(p.lat, p.lon, p.km) for p in route.sample(100.0)] == [(-33.9, 18.4, 0.0)]
    assert parse_route(route.to_geojson(), "again").points[0] == (-33.9, 18.4)


def test_geojson_round_trip_keeps_altitudes() -> None:
    route = Route(((1.0, 2.0, 30.0), (1.1, 2.1, 40.0)))
    again = parse_route({"type": "Feature", "geometry": route.to_geojson()}, "f")
    assert again == route
    assert again.altitudes == (30.0, 40.0)


@pytest.mark.parametrize(
    "obj,fragment",
    [
        ({"type": "Point", "coordinates": [1, 2]}, "LineString"),
        ({"type": "LineString", "coordinates": []}, "no coordinates"),
        ({"type": "LineString", "coordinates": [[1, "2"]]}, "position 0"),
        ({"type": "LineString", "coordinates": [[1, 2], [1, math.nan]]}, "position 1"),
        ({"type": "LineString", "coordinates": [[1, 2], [True, 2]]}, "position 1"),
        ({"type": "LineString", "coordinates": [[200, 2]]}, "off the map"),
    ],
)
def test_bad_routes_are_refused_with_what_is_wrong(obj: object, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        parse_route(obj, "route.geojson")


def test_bearing_points_the_compass_way() -> None:
    assert bearing_deg(0, 0, 1, 0) == pytest.approx(0.0)
    assert bearing_deg(0, 0, 0, 1) == pytest.approx(90.0)
    assert bearing_deg(0, 0, -1, 0) == pytest.approx(180.0)
    assert bearing_deg(0, 0, 0, -1) == pytest.approx(270.0)
    with pytest.raises(ValueError):
        next(Route(((0.0, 0.0), (1.0, 0.0))).sample(0.0))
