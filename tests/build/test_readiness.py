"""The readiness verdict and the tile coverage it rests on, without a build: real tile
lists (tiles_for_area, the bbox's range) in three hemispheres, the verdict a pure
function of them and of the self-test's figures."""

from __future__ import annotations

import math
from typing import Any

import pytest

from takeoff_cache.build.coverage import TileCoverage, TileKey, tile_coverage
from takeoff_cache.build.options import build_options, for_prepare
from takeoff_cache.build.readiness import Thresholds, headline, readiness_lines, verdict
from takeoff_cache.core.tilemath import haversine_m, lonlat_to_fractional_tile, tile_center
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.localize.coverage_map import needed_tiles
from takeoff_cache.tiles.route import Route

Bbox = tuple[float, float, float, float]
# (name, bbox, a route across it): Ukraine (N/E), Cape Town (S/E), Buenos Aires (S/W).
PLACES: list[tuple[str, Bbox, tuple[tuple[float, float], ...]]] = [
    ("north-east", (48.44, 35.02, 48.47, 35.07), ((48.445, 35.025), (48.465, 35.065))),
    ("south-east", (-33.96, 18.40, -33.93, 18.45), ((-33.955, 18.405), (-33.935, 18.445))),
    ("south-west", (-34.62, -58.42, -34.59, -58.37), ((-34.615, -58.415), (-34.595, -58.375))),
]
IDS = [p[0] for p in PLACES]
ZOOMS = (15, 16)
ROUTE_FIGURES = {"recall_at_1": 0.91, "recall_at_5": 0.98, "median_error_m": 40.0, "views": 60}
SELF_TEST = {"k": 60, "recall_at_1": 0.9, "recall_at_5": 0.97, "median_error_m": 45.0}
PROTECTIVE = Thresholds(min_coverage=0.98, min_recall=0.5)


def _coverage(
    bbox: Bbox, route: Route | None, drop: frozenset[TileKey] = frozenset()
) -> TileCoverage:
    present = [t for t in needed_tiles(bbox, ZOOMS) if t not in drop]
    return tile_coverage(bbox, ZOOMS, present, route=route)


def _tile_at(lat: float, lon: float, z: int) -> TileKey:
    fx, fy = lonlat_to_fractional_tile(lat, lon, z)
    return (z, math.floor(fx), math.floor(fy))


@pytest.mark.parametrize(("name", "bbox", "points"), PLACES, ids=IDS)
def test_the_route_tiles_are_those_under_it(name: str, bbox: Bbox, points: Any) -> None:
    from takeoff_cache.tiles.area import tiles_for_area

    route = Route(points)
    covered = _coverage(bbox, route)
    assert covered.route is not None
    under = set(tiles_for_area(route.corridor(150.0), ZOOMS)) & set(needed_tiles(bbox, ZOOMS))
    assert sum(z.needed for z in covered.route.per_zoom) == len(under)
    # Every tile the route passes over is under it; the corridor is a strip, not the bbox.
    for p in route.sample(10.0):
        for z in ZOOMS:
            assert _tile_at(p.lat, p.lon, z) in under
    # ...and nothing farther than the footprint and a tile's half-diagonal from it.
    for t in under:
        lat, lon = tile_center(*t)
        nearest = min(haversine_m(lat, lon, q.lat, q.lon) for q in route.sample(10.0))
        half_diagonal = 40075016.7 * math.cos(math.radians(lat)) / 2 ** t[0] / math.sqrt(2)
        assert nearest <= 150.0 + half_diagonal + 10.0
    assert len(under) < covered.needed
    assert covered.route.length_km == pytest.approx(route.length_km)


@pytest.mark.parametrize(("name", "bbox", "points"), PLACES, ids=IDS)
def test_a_full_corpus_is_ready(name: str, bbox: Bbox, points: Any) -> None:
    covered = _coverage(bbox, Route(points))
    assert all(z.fraction == 1.0 for z in covered.per_zoom)
    ready = verdict(covered, {**SELF_TEST, "route": ROUTE_FIGURES}, PROTECTIVE)
    assert ready["ok"] and ready["verdict"] == "ready"
    assert ready["reasons"] == [] and ready["gaps"] == []
    assert ready["localization"]["source"] == "route"
    assert ready["localization"]["recall_at_1"] == 0.91
    assert ready["route"]["holes_count"] == 0 and ready["route"]["footprint_m"] == 150.0
    assert headline(ready) == "READY"


@pytest.mark.parametrize(("name", "bbox", "points"), PLACES, ids=IDS)
def test_a_hole_under_the_route_is_not_ready_and_named_with_its_km(
    name: str, bbox: Bbox, points: Any
) -> None:
    route = Route(points)
    middle = list(route.sample(route.length_km * 500.0))[1]  # halfway along
    hole = _tile_at(middle.lat, middle.lon, 16)
    covered = _coverage(bbox, route, frozenset({hole}))
    assert covered.route is not None
    (found,) = covered.route.holes
    assert found.tile == hole
    # Where it falls along a straight route: the distance from takeoff to its centre.
    centre = tile_center(*hole)
    from_takeoff = haversine_m(points[0][0], points[0][1], *centre) / 1000.0
    assert found.km == pytest.approx(from_takeoff, abs=0.25)
    assert 0.0 < found.km < route.length_km

    ready = verdict(covered, {**SELF_TEST, "route": ROUTE_FIGURES}, PROTECTIVE)
    assert not ready["ok"] and ready["verdict"] == "not ready"
    (reason,) = [r for r in ready["reasons"] if r.startswith("route:")]
    assert f"{hole[0]}/{hole[1]}/{hole[2]} (km {found.km:.1f})" in reason
    assert "--allow-gaps" in reason and "\n" not in reason
    assert ready["route"]["holes"] == [{"tile": "/".join(map(str, hole)), "km": round(found.km, 2)}]


def test_allow_gaps_is_ready_with_the_gap_stated() -> None:
    _name, bbox, points = PLACES[1]
    route = Route(points)
    hole = _tile_at(*points[0], 16)  # under takeoff itself
    covered = _coverage(bbox, route, frozenset({hole}))
    gaps = Thresholds(min_coverage=0.5, min_recall=0.5, allow_gaps=True)
    ready = verdict(covered, {**SELF_TEST, "route": ROUTE_FIGURES}, gaps)
    assert ready["ok"] and ready["verdict"] == "ready with gaps" and ready["allow_gaps"]
    (gap,) = ready["gaps"]
    assert "/".join(map(str, hole)) in gap and "km 0.0" in gap
    assert headline(ready).startswith("READY WITH GAPS")
    assert any(line.startswith("  gap:") for line in readiness_lines(ready))


def test_area_coverage_below_the_minimum_names_the_zoom_and_only_when_judged() -> None:
    _name, bbox, points = PLACES[0]
    route = Route(points)
    corner = needed_tiles(bbox, (15,))[0]  # the area's north-west corner, off the route
    covered = _coverage(bbox, route, frozenset({corner}))
    assert covered.route is not None and not covered.route.holes
    z15 = covered.per_zoom[0]
    assert (z15.zoom, z15.holes, z15.present) == (15, (corner,), z15.needed - 1)
    ready = verdict(covered, SELF_TEST, PROTECTIVE)
    (reason,) = ready["reasons"]
    assert reason.startswith(f"coverage: zoom 15 holds {z15.present} of the area's {z15.needed}")
    assert "/".join(map(str, corner)) in reason and "--min-coverage 0.98" in reason
    # build's default: reported, not judged.
    assert verdict(covered, SELF_TEST, Thresholds())["ok"]
    assert verdict(covered, SELF_TEST, Thresholds())["coverage"]["per_zoom"]["15"]["holes"] == [
        "/".join(map(str, corner))
    ]


def test_a_weak_route_recall_is_not_ready_naming_it_and_its_weakest_stretch() -> None:
    covered = _coverage(PLACES[2][1], Route(PLACES[2][2]))
    weak = {
        **ROUTE_FIGURES,
        "recall_at_1": 0.12,
        "weakest": {"from_km": 1.0, "to_km": 2.5, "recall_at_1": 0.0},
    }
    ready = verdict(covered, {**SELF_TEST, "route": weak}, PROTECTIVE)
    assert ready["reasons"] == [
        "localization: route Recall@1 0.12 is below --min-recall 0.5 (weakest: km 1.0-2.5,"
        " Recall@1 0.00); the backbone cannot place this area"
    ]
    # Without route figures the overall Recall@1 is judged; 0 turns the check off.
    low = {**SELF_TEST, "recall_at_1": 0.2}
    assert "self-test Recall@1 0.20" in verdict(covered, low, PROTECTIVE)["reasons"][0]
    assert verdict(covered, low, Thresholds(0.98, 0.0))["ok"]
    # A low recall is never a gap.
    assert not verdict(covered, low, Thresholds(0.98, 0.5, allow_gaps=True))["ok"]


def test_no_route_and_no_self_test_are_said_not_hidden() -> None:
    covered = _coverage(PLACES[0][1], None)
    ready = verdict(covered, None, PROTECTIVE)
    assert ready["ok"] and ready["route"] is None and ready["localization"] is None
    assert any("no path; the verdict rests on the area" in n for n in ready["notes"])
    assert any("not tested" in n for n in ready["notes"])


def test_the_lines_for_a_person_hold_no_python_reprs() -> None:
    _name, bbox, points = PLACES[0]
    route = Route(points)
    hole = _tile_at(*points[1], 16)
    ready = verdict(
        _coverage(bbox, route, frozenset({hole})), {**SELF_TEST, "route": None}, PROTECTIVE
    )
    text = "\n".join(readiness_lines(ready))
    assert text.startswith("ready:    NOT READY")
    for repr_mark in ("None", "{", "}", "[", "'"):
        assert repr_mark not in text, text
    assert "z15 " in text and "route:  " in text


def test_prepare_defaults_protect_and_a_given_value_is_kept() -> None:
    filled = for_prepare({"min_recall": None, "min_coverage": None, "self_test": 200})
    assert filled == {
        "min_recall": 0.5,
        "min_coverage": 0.98,
        "self_test": 200,
        "require_ready": True,
    }
    kept = for_prepare({"min_recall": 0.0, "min_coverage": 0.5, "self_test": 200})
    assert (kept["min_recall"], kept["min_coverage"]) == (0.0, 0.5)
    # No self-test, no recall to judge (and no error for a threshold it cannot meet).
    untested = build_options(**for_prepare({"self_test": 0, "min_recall": None}))
    assert untested.min_recall is None and untested.gated


@pytest.mark.parametrize(
    ("value", "expected"),
    [("yes", True), ("True", True), ("no", False), (False, False), (None, False)],
)
def test_switches_read_as_flags_and_as_the_companion_passes_them(
    value: Any, expected: bool
) -> None:
    assert build_options(allow_gaps=value).allow_gaps is expected


def test_build_gates_only_when_asked() -> None:
    assert not build_options().gated
    assert build_options(require_ready="yes").gated
    assert build_options(min_coverage="0.9").gated
    with pytest.raises(InvalidRequestError, match=r"^allow-gaps: expected yes or no"):
        build_options(allow_gaps="maybe")
    with pytest.raises(InvalidRequestError, match=r"^min-coverage: 1\.5 is outside"):
        build_options(min_coverage=1.5)


def test_ground_beyond_the_area_is_said_not_counted_as_holes() -> None:
    _name, bbox, points = PLACES[0]
    # The route runs on 0.01 degrees (about 1.1 km) north of the bbox.
    beyond = Route((*points, (bbox[2] + 0.01, points[-1][1])))
    covered = _coverage(bbox, beyond)
    assert covered.route is not None and covered.route.outside_area > 0
    assert not covered.route.holes
    ready = verdict(covered, SELF_TEST, PROTECTIVE)
    assert ready["ok"] and ready["route"]["outside_area"] == covered.route.outside_area
    assert any("lie outside the area" in n for n in ready["notes"])
