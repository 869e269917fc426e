"""The self-test's views along a flight's route: where they fall, how they are turned and
scaled, and the figures per stretch of route. Pure draws and figures: no cache needed."""

from __future__ import annotations

import itertools
import math

import pytest

from takeoff_cache.core.tilemath import haversine_m, lonlat_to_fractional_tile
from takeoff_cache.localize.selftest import (
    MIN_STRETCH_VIEWS,
    QueryOutcome,
    ViewJitter,
    altitude_scale,
    draw_route_views,
    route_figures,
    stretch_km,
    view_seed,
    weakest_text,
)
from takeoff_cache.tiles.route import Route

NORTH_UP = ViewJitter(max_rotation_deg=0.0)


def tiles_around(route: Route, zooms: tuple[int, ...], pad: int = 1) -> list[tuple[int, int, int]]:
    """Every tile of ``zooms`` in the box around the route, ``pad`` tiles wider."""
    out = []
    for z in zooms:
        xs, ys = zip(*(lonlat_to_fractional_tile(p[0], p[1], z) for p in route.points), strict=True)
        for x in range(math.floor(min(xs)) - pad, math.floor(max(xs)) + pad + 1):
            for y in range(math.floor(min(ys)) - pad, math.floor(max(ys)) + pad + 1):
                out.append((z, x, y))
    return sorted(out)


# A leg west then south of Santiago de Chile (south and west of both the equator and
# Greenwich), and one north across the equator off Ecuador.
SANTIAGO = Route(((-33.45, -70.66, 120.0), (-33.45, -70.70, 120.0), (-33.48, -70.70, 240.0)))
EQUATOR = Route(((-0.01, -80.5), (0.01, -80.5)))


@pytest.mark.parametrize("route", [SANTIAGO, EQUATOR], ids=["santiago", "equator"])
def test_views_fall_on_the_route_at_even_spacing(route: Route) -> None:
    tiles = tiles_around(route, (16, 17))
    views = draw_route_views(tiles, route, 40, "route", NORTH_UP)
    assert len(views) == 40
    kms = [v.km for v in views]
    assert kms[0] == 0.0 and kms[-1] == pytest.approx(route.length_km)
    steps = [b - a for a, b in itertools.pairwise(kms)]
    assert max(steps) - min(steps) < 1e-9  # evenly spaced
    held = set(tiles)
    for view in views:
        assert view.tile in held
        assert -0.5 <= view.dx < 0.5 and -0.5 <= view.dy < 0.5  # on its own tile
        # Its centre is the route's position at its km, whatever the hemisphere.
        lat, lon = view.center
        assert lat < 0.02 and lon < 0
        assert route.km_of(lat, lon) == pytest.approx(view.km, abs=1e-3)
        assert {v.tile[0] for v in views} == {16, 17}  # both zooms the index holds


def test_heading_follows_the_route_and_scale_the_altitude() -> None:
    tiles = tiles_around(SANTIAGO, (17,))
    views = draw_route_views(tiles, SANTIAGO, 60, "route", ViewJitter(max_rotation_deg=0.0))
    west = [v for v in views if v.km is not None and v.km < 3.0]
    south = [v for v in views if v.km is not None and v.km > 3.8]
    assert all(v.rotation_deg == pytest.approx(-90.0, abs=0.1) for v in west)
    assert all(abs(abs(v.rotation_deg) - 180.0) < 0.1 for v in south)
    # The first leg at 120 m, the second climbing to 240 m: higher sees more ground.
    low, high = ViewJitter().scale
    assert all(low <= v.scale <= high for v in views)
    assert max(v.scale for v in south[-5:]) < min(v.scale for v in west)
    centre = math.sqrt(low * high)
    assert altitude_scale(150.0, 120.0, ViewJitter()) == pytest.approx(centre * 0.8)
    assert altitude_scale(240.0, 120.0, ViewJitter()) == low  # kept in the band
    assert altitude_scale(None, 120.0, ViewJitter()) == pytest.approx(math.sqrt(low * high))


def test_any_heading_by_default_and_a_route_without_altitudes_keeps_the_band() -> None:
    tiles = tiles_around(EQUATOR, (16,))
    views = draw_route_views(tiles, EQUATOR, 100, "route")
    assert max(v.rotation_deg for v in views) > 150 and min(v.rotation_deg for v in views) < -150
    assert all(-180.0 <= v.rotation_deg < 180.0 for v in views)
    low, high = ViewJitter().scale
    assert min(v.scale for v in views) < 0.8 and max(v.scale for v in views) > 1.25
    assert all(low <= v.scale <= high for v in views)


def test_a_hole_under_the_route_gets_no_view_and_moves_no_other() -> None:
    tiles = tiles_around(EQUATOR, (16,))
    full = draw_route_views(tiles, EQUATOR, 30, "route")
    hole = full[10].tile
    holed = draw_route_views([t for t in tiles if t != hole], EQUATOR, 30, "route")
    assert [v for v in full if v.tile != hole] == holed
    assert len(holed) < 30


def test_the_seed_follows_tile_positions_and_route_never_bytes() -> None:
    tiles = tiles_around(EQUATOR, (16,))
    assert view_seed(tiles) == view_seed(list(tiles))
    assert view_seed(tiles) != view_seed(tiles[1:])
    assert view_seed(tiles, EQUATOR) != view_seed(tiles)
    assert view_seed(tiles, EQUATOR) != view_seed(tiles, SANTIAGO)


def outcome(km: float, rank: int | None, error_m: float = 50.0) -> QueryOutcome:
    return QueryOutcome((17, 1, 1), rank, (0.0, 0.0), (0.0, 0.0), error_m, (17, 1, 1), 0, 1, km)


def test_figures_per_stretch_name_the_weakest() -> None:
    assert stretch_km(3.0) == 0.5 and stretch_km(25.0) == 2.5 and stretch_km(101.0) == 10.5
    # 30 km: 3 km stretches. Views every 0.5 km; the stretch 12-15 km finds 1 in 6.
    queries = []
    for i in range(60):
        km = i * 0.5
        weak = 12.0 <= km < 15.0
        queries.append(outcome(km, None if weak and i % 6 else 1, 900.0 if weak else 40.0))
    figures = route_figures(queries, 30.0)
    assert figures["views"] == 60 and figures["stretch_km"] == 3.0
    assert len(figures["stretches"]) == 10
    assert figures["weakest"] == {"from_km": 12.0, "to_km": 15.0, "recall_at_1": 0.1667}
    assert weakest_text(figures) == "km 12.0\u201315.0: Recall@1 0.17"
    assert figures["recall_at_1"] == pytest.approx(55 / 60, abs=1e-4)
    weak = figures["stretches"][4]
    assert (weak["views"], weak["median_error_m"]) == (6, 900.0)


def test_a_stretch_of_few_views_is_never_the_weakest() -> None:
    queries = [outcome(0.1 * i, 1) for i in range(MIN_STRETCH_VIEWS)]
    queries.append(outcome(2.9, None))  # alone in the last stretch
    figures = route_figures(queries, 3.0)
    assert figures["stretches"][-1]["recall_at_1"] == 0.0
    assert figures["weakest"] == {"from_km": 0.0, "to_km": 0.5, "recall_at_1": 1.0}
    assert route_figures([outcome(0.1, None)], 3.0)["weakest"] is None


def test_positions_are_the_routes_own() -> None:
    # One view per position, spaced on the ground: the spacing in metres holds at 33 S.
    tiles = tiles_around(SANTIAGO, (17,))
    views = draw_route_views(tiles, SANTIAGO, 11, "route")
    gaps = [haversine_m(*a.center, *b.center) for a, b in itertools.pairwise(views)]
    spacing_m = SANTIAGO.length_km * 100
    # Every gap is the spacing but the one that cuts the corner between the legs.
    assert sum(g == pytest.approx(spacing_m, rel=0.01) for g in gaps) == len(gaps) - 1
    assert max(gaps) < spacing_m * 1.01
