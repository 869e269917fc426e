"""The route prepare hands the build: the flight's path, home first, or none."""

from __future__ import annotations

from takeoff_cache.build.request import parse_route_field
from takeoff_cache.prepare.flight import Circle, Flight
from takeoff_cache.prepare.job import flight_route


def test_the_route_is_home_then_the_path_in_order() -> None:
    flight = Flight(
        id=None,
        source="test",
        positions=((-33.86, 151.21, 80.0), (-33.87, 151.23, 90.0)),
        planned_home=(-33.855, 151.2, 0.0),
    )
    route = parse_route_field(flight_route(flight))
    assert route is not None
    assert route.points == ((-33.855, 151.2, 0.0), (-33.86, 151.21, 80.0), (-33.87, 151.23, 90.0))
    assert route.length_km > 1.0


def test_a_flight_without_a_path_has_no_route() -> None:
    flight = Flight(id=None, source="test", circles=(Circle((48.45, 35.04), 300.0),))
    assert flight_route(flight) is None
