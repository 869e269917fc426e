"""The coverage map of a real demo cache and its self-test: size, legend colours, layers;
a build over an area polygon tests and maps that area, not its bbox."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.localize.coverage_map import (
    AREA_COLOUR,
    HIT_COLOUR,
    MISS_COLOUR,
    ZOOM_COLOURS,
    area_rings,
    missing_tiles,
    write_coverage_map,
)
from takeoff_cache.localize.selftest import run_self_test
from takeoff_cache.tiles.area import tiles_for_area
from tests.support.caches import build_demo_cache, localizer_of
from tests.support.cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def built(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_cache(demo_source, tmp_path_factory.mktemp("map") / "demo")


def colours_in(path: Path) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}


def outline_rows(path: Path) -> list[float]:
    """Rows of the map (0: top, 1: bottom) that the area's outline crosses for most of
    the map's width: a bbox's top and bottom edges, a triangle's base alone."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    map_ = pixels[56 : pixels.shape[0] - 64, : pixels.shape[1] - 320]
    dark = (map_ == np.array(AREA_COLOUR, dtype=np.uint8)).all(axis=2)
    rows = np.flatnonzero(dark.sum(axis=1) > 0.6 * map_.shape[1])
    return [r / map_.shape[0] for r in rows.tolist()]


def triangle_in(bbox: tuple[float, float, float, float]) -> dict[str, Any]:
    """A triangle on the bbox's south edge with its apex at the north edge's middle."""
    lat0, lon0, lat1, lon1 = bbox
    ring = [[lon0, lat0], [lon1, lat0], [(lon0 + lon1) / 2, lat1], [lon0, lat0]]
    return {"type": "Polygon", "coordinates": [ring]}


@pytest.fixture(scope="module")
def area_built(
    demo_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """The demo built over a triangle of its bbox, given as ``--area``."""
    bbox = tomllib.loads((demo_source / "request.toml").read_text())["bbox"]
    folder = tmp_path_factory.mktemp("map-area")
    area = triangle_in(tuple(bbox))
    (folder / "area.geojson").write_text(json.dumps(area))
    root = build_demo_cache(demo_source, folder / "demo", "--area", str(folder / "area.geojson"))
    return root, area


def test_the_map_shows_tiles_missing_tiles_hits_and_misses(built: Path, tmp_path: Path) -> None:
    manifest, localizer = localizer_of(built)
    result = run_self_test(localizer, built / "corpus.mbtiles", seed="map")
    assert 0 < sum(q.hit for q in result.queries) < result.k  # both kinds are drawn
    bbox = tuple(manifest.signed["request"]["bbox"])
    wider = (bbox[0] - 0.003, bbox[1], bbox[2], bbox[3] + 0.004)  # beyond the corpus
    missing = missing_tiles(wider, [16, 17], localizer.tiles)
    assert missing and not set(missing) & set(localizer.tiles)
    path = write_coverage_map(
        tmp_path / "map.png",
        bbox=wider,
        tiles=localizer.tiles,
        missing=missing,
        queries=result.queries,
        title="Coverage and self-test",
    )
    image = Image.open(path)
    assert image.format == "PNG"
    # The map is 900 px on its longer side, plus the legend panel, title and footer.
    map_width, map_height = image.width - 320, image.height - 56 - 64
    assert max(map_width, map_height) == 900
    found = colours_in(path)
    for colour in (ZOOM_COLOURS[0], ZOOM_COLOURS[1], HIT_COLOUR, MISS_COLOUR):
        assert colour in found, colour


def test_an_area_polygon_is_drawn_instead_of_the_bbox(built: Path, tmp_path: Path) -> None:
    manifest, localizer = localizer_of(built)
    lat0, lon0, lat1, lon1 = manifest.signed["request"]["bbox"]
    triangle = [[lon0, lat0], [lon1, lat0], [(lon0 + lon1) / 2, lat1], [lon0, lat0]]
    area = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [triangle]}}
    assert len(area_rings(area)) == 1
    with_area = tmp_path / "area.png"
    write_coverage_map(with_area, bbox=(lat0, lon0, lat1, lon1), tiles=localizer.tiles, area=area)
    plain = tmp_path / "bbox.png"
    write_coverage_map(plain, bbox=(lat0, lon0, lat1, lon1), tiles=localizer.tiles)
    assert Image.open(with_area).size == Image.open(plain).size
    bbox_rows, area_rows = outline_rows(plain), outline_rows(with_area)
    assert min(bbox_rows) < 0.5 < max(bbox_rows)  # the rectangle's top and bottom
    assert area_rows and min(area_rows) > 0.5  # the triangle's base only


def test_a_build_over_an_area_tests_and_maps_only_the_area(
    area_built: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root, area = area_built
    manifest, localizer = localizer_of(root)
    signed = manifest.signed
    assert signed["request"]["area"] is not None
    selected, zooms = set(localizer.tiles), signed["request"]["zoom_levels"]
    assert selected <= set(tiles_for_area(area, zooms))
    bbox_tiles = missing_tiles(tuple(signed["request"]["bbox"]), zooms, [])
    assert 0 < len(selected) < len(bbox_tiles)  # the triangle leaves the bbox's corners out
    queried = {(row[0], row[1], row[2]) for row in signed["self_test"]["queries"]}
    assert queried == selected  # every selected tile once (K=200 > tiles), no other
    assert signed["self_test"]["k"] == len(selected)

    drawn = tmp_path / "area.png"
    inspected = run_cli(capsys, "inspect", str(root / "cache"), "--png", str(drawn))
    assert inspected.code == 0, inspected.err
    rows = outline_rows(drawn)
    assert rows and min(rows) > 0.5  # the polygon is drawn, not the bbox's rectangle


def test_an_area_that_is_not_a_polygon_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="Polygon or MultiPolygon"):
        area_rings({"type": "LineString", "coordinates": [[0, 0], [1, 1]]})
    with pytest.raises(InvalidRequestError, match="unreadable Polygon"):
        area_rings({"type": "Polygon", "coordinates": [[["a"]]]})


def test_missing_tiles_are_those_the_bbox_needs_and_the_corpus_lacks() -> None:
    bbox = (48.44, 35.02, 48.47, 35.07)
    needed = missing_tiles(bbox, [16], [])
    assert len(needed) == len(set(needed)) > 0
    assert missing_tiles(bbox, [16], needed) == []
    assert missing_tiles(bbox, [16], needed[1:]) == needed[:1]


def test_the_flight_is_drawn_over_many_misses_with_its_holes_and_weak_stretch(
    tmp_path: Path,
) -> None:
    """Route, waypoints, takeoff, a hole under the route in its own colour and the weak
    stretch stay visible under 300 misses (southern and western hemisphere)."""
    from takeoff_cache.core.tilemath import lonlat_to_fractional_tile
    from takeoff_cache.localize.coverage_map import (
        ROUTE_COLOUR,
        ROUTE_HOLE_COLOUR,
        WEAK_COLOUR,
        coverage_map_png,
    )
    from takeoff_cache.localize.selftest import QueryOutcome
    from takeoff_cache.tiles.route import Route

    bbox = (-34.62, -58.42, -34.59, -58.37)
    route = Route(((-34.615, -58.415, 0.0), (-34.605, -58.395, 120.0), (-34.595, -58.375, 120.0)))
    tiles = [(16, x, y) for x in range(22130, 22141) for y in range(39559, 39567)]
    fx, fy = lonlat_to_fractional_tile(-34.605, -58.395, 16)
    hole = (16, int(fx), int(fy))
    rng = np.random.default_rng(3)
    misses = [
        QueryOutcome(
            hole,
            None,
            (float(rng.uniform(-34.62, -34.59)), float(rng.uniform(-58.42, -58.37))),
            (float(rng.uniform(-34.62, -34.59)), float(rng.uniform(-58.42, -58.37))),
            1500.0,
            hole,
            0.0,
            1.0,
        )
        for _ in range(300)
    ]
    png = coverage_map_png(
        bbox=bbox,
        tiles=[t for t in tiles if t != hole],
        queries=misses,
        route=route,
        route_holes=[hole],
        weak=[(2.5, 3.5)],
    )
    path = tmp_path / "flight.png"
    path.write_bytes(png)
    seen = colours_in(path)
    for colour in (ROUTE_COLOUR, WEAK_COLOUR, MISS_COLOUR):
        assert colour in seen, colour
    # The hole is drawn in its own colour (blended over the map), not the corpus's grey.
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    magenta = (
        (abs(pixels[..., 0] - ROUTE_HOLE_COLOUR[0]) < 40)
        & (pixels[..., 1] < 120)
        & (abs(pixels[..., 2] - ROUTE_HOLE_COLOUR[2]) < 60)
    )
    assert magenta.sum() > 200
