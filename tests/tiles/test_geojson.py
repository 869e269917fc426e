"""An area as plain JSON: its bounds as shapely gives them, and normalized areas the work
folder remembers, used only while intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import shape

from takeoff_cache.tiles.area import parse_area
from takeoff_cache.tiles.geojson import bounds, geometries, recall, remember

RING = [[35.02, 48.44], [35.07, 48.44], [35.07, 48.47], [35.02, 48.44]]
SQUARE = [[35.1, 48.5], [35.1, 48.52], [35.13, 48.52], [35.13, 48.5], [35.1, 48.5]]
HOLE = [[35.11, 48.505], [35.12, 48.505], [35.12, 48.51], [35.11, 48.505]]
POLYGON = {"type": "Polygon", "coordinates": [RING]}
MULTI = {"type": "MultiPolygon", "coordinates": [[RING], [SQUARE, HOLE]]}


@pytest.mark.parametrize("raw", [POLYGON, MULTI], ids=["polygon", "multipolygon with a hole"])
def test_bounds_are_shapelys_in_the_requests_order(raw: dict[str, Any]) -> None:
    area = parse_area(raw, "test").geojson
    lon_min, lat_min, lon_max, lat_max = shape(area).bounds
    assert bounds(area) == (lat_min, lon_min, lat_max, lon_max)


def test_a_feature_collections_geometries_are_found_without_shapely() -> None:
    features = [{"type": "Feature", "properties": {}, "geometry": g} for g in (POLYGON, MULTI)]
    collection = {"type": "FeatureCollection", "features": features}
    assert geometries(collection, "test") == [POLYGON, MULTI]


def test_a_remembered_area_is_recalled_by_its_geometries(tmp_path: Path) -> None:
    area = parse_area(POLYGON, "test").geojson
    assert recall(tmp_path, [POLYGON]) is None
    remember(tmp_path, [POLYGON], area)
    assert recall(tmp_path, [POLYGON]) == area
    assert recall(tmp_path, [MULTI]) is None


def test_a_damaged_entry_is_not_used(tmp_path: Path) -> None:
    area = parse_area(POLYGON, "test").geojson
    remember(tmp_path, [POLYGON], area)
    (entry,) = tmp_path.iterdir()
    doc = json.loads(entry.read_text())
    doc["area"]["coordinates"][0][0][0] += 0.01  # another area under the same key
    entry.write_text(json.dumps(doc))
    assert recall(tmp_path, [POLYGON]) is None
    entry.write_text("{not json")
    assert recall(tmp_path, [POLYGON]) is None


def test_a_folder_that_cannot_be_written_only_costs_speed(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    remember(blocked, [POLYGON], parse_area(POLYGON, "test").geojson)
    assert recall(blocked, [POLYGON]) is None


def test_geometries_that_canonical_json_refuses_are_never_remembered(tmp_path: Path) -> None:
    nan = {"type": "Polygon", "coordinates": [[[float("nan"), 48.44], *RING[1:]]]}
    remember(tmp_path, [nan], parse_area(POLYGON, "test").geojson)
    assert list(tmp_path.iterdir()) == []
    assert recall(tmp_path, [nan]) is None
