"""The build request: normalization of flags and TOML values, and one clear error per field."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.build.request import Bbox, parse_request, read_request_file
from takeoff_cache.errors import InvalidRequestError

FLIGHT = "0b6f6a3e-8f38-4c1b-9a43-5f0a7c3d2e11"


def paths(root: Path) -> dict[str, str]:
    return {
        "corpus": str(root / "corpus.mbtiles"),
        "backbones": str(root / "backbones.toml"),
        "cache_root": str(root / "cache"),
        "key": str(root / "operator.key"),
        "trust": str(root / "trust"),
    }


def as_flags(root: Path) -> dict[str, Any]:
    return {
        **paths(root),
        "bbox": "48.44,35.02,48.47,35.07",
        "zoom_levels": "17,16",
        "sector_class": "active_conflict",
        "precision": "fp16",
        "takeoff_origin": "48.45, 35.04, 120",
        "flight_id": FLIGHT.upper(),
    }


def as_toml(root: Path) -> dict[str, Any]:
    return {
        **paths(root),
        "bbox": [48.44, 35.02, 48.47, 35.07],
        "zoom_levels": [16, 17],
        "sector_class": "active_conflict",
        "precision": "fp16",
        "takeoff_origin": [48.45, 35.04, 120],
        "flight_id": FLIGHT,
    }


def refused(raw: dict[str, Any], field: str) -> str:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(raw)
    message = str(info.value)
    assert message.startswith(field), message
    return message


def test_flag_strings_and_toml_lists_normalize_identically(tmp_path: Path) -> None:
    from_flags = parse_request(as_flags(tmp_path))
    from_toml = parse_request(as_toml(tmp_path))
    assert from_flags == from_toml
    assert from_toml.bbox == Bbox(48.44, 35.02, 48.47, 35.07)
    assert from_toml.zoom_levels == (16, 17)
    assert from_toml.takeoff_origin == (48.45, 35.04, 120.0)
    assert from_toml.flight_id == FLIGHT
    assert from_toml.corpus == (tmp_path / "corpus.mbtiles").resolve()
    assert from_flags.to_json() == from_toml.to_json()


def test_optional_fields_default(tmp_path: Path) -> None:
    raw = as_toml(tmp_path)
    for name in ("precision", "takeoff_origin", "flight_id"):
        del raw[name]
    request = parse_request(raw)
    assert request.precision == "fp32"
    assert request.calibration is None
    assert request.takeoff_origin is None
    assert request.flight_id is None


def test_zoom_levels_are_deduplicated_and_sorted(tmp_path: Path) -> None:
    raw = {**as_toml(tmp_path), "zoom_levels": "17, 16,17"}
    assert parse_request(raw).zoom_levels == (16, 17)
    assert parse_request({**raw, "zoom_levels": 0}).zoom_levels == (0,)
    assert parse_request({**raw, "zoom_levels": [22]}).zoom_levels == (22,)


def test_bbox_at_the_mercator_and_antimeridian_limits_is_accepted(tmp_path: Path) -> None:
    raw = {**as_toml(tmp_path), "bbox": [-85.0511, -180, 85.0511, 180]}
    assert parse_request(raw).bbox == Bbox(-85.0511, -180.0, 85.0511, 180.0)


def test_int8_with_calibration_is_accepted(tmp_path: Path) -> None:
    raw = {**as_toml(tmp_path), "precision": "int8", "calibration": str(tmp_path / "cal.bin")}
    request = parse_request(raw)
    assert request.precision == "int8"
    assert request.calibration == (tmp_path / "cal.bin").resolve()


@pytest.mark.parametrize(
    "bbox",
    [
        [86.0, 35.0, 87.0, 36.0],  # lat above Web Mercator
        [48.0, 35.0, 86.0, 36.0],
        [-86.0, 35.0, 48.0, 36.0],
        [48.0, 35.0, 49.0, 181.0],  # lon beyond 180
        [48.0, -181.0, 49.0, 36.0],
        "85.0512,0,85.06,1",
    ],
)
def test_bbox_out_of_range_is_refused(tmp_path: Path, bbox: Any) -> None:
    message = refused({**as_toml(tmp_path), "bbox": bbox}, "bbox")
    assert "outside" in message


@pytest.mark.parametrize(
    "bbox",
    [
        [48.47, 35.02, 48.44, 35.07],  # lat inverted
        [48.44, 35.07, 48.47, 35.02],  # lon inverted
        [48.44, 35.02, 48.44, 35.07],  # lat equal
        [48.44, 35.02, 48.47, 35.02],  # lon equal
    ],
)
def test_bbox_with_min_not_below_max_is_refused(tmp_path: Path, bbox: list[float]) -> None:
    message = refused({**as_toml(tmp_path), "bbox": bbox}, "bbox")
    assert "below" in message


@pytest.mark.parametrize(
    "bbox", [[48.44, 35.02, 48.47], [48.44, 35.02, 48.47, 35.07, 1.0], "48.44,35.02,48.47", []]
)
def test_bbox_with_wrong_count_is_refused(tmp_path: Path, bbox: Any) -> None:
    refused({**as_toml(tmp_path), "bbox": bbox}, "bbox")


@pytest.mark.parametrize(
    "bbox",
    [
        ["48.44", "35.02", "48.47", "35.07"],
        [48.44, 35.02, 48.47, True],
        "a,b,c,d",
        "48.44;35.02;48.47;35.07",
        48.44,
        {"lat_min": 48.44},
        [48.44, float("nan"), 48.47, 35.07],
        "48.44,35.02,inf,35.07",
    ],
)
def test_bbox_that_is_not_numbers_is_refused(tmp_path: Path, bbox: Any) -> None:
    refused({**as_toml(tmp_path), "bbox": bbox}, "bbox")


@pytest.mark.parametrize(
    "zoom", [[], "", " , ", 23, -1, [16, 23], "-1", "a", "16,a", [16.0], [True], 1.5, None]
)
def test_bad_zoom_levels_are_refused(tmp_path: Path, zoom: Any) -> None:
    refused({**as_toml(tmp_path), "zoom_levels": zoom}, "zoom_levels")


@pytest.mark.parametrize("sector", ["unknown", "Active_Conflict", "", 1])
def test_unknown_sector_class_is_refused(tmp_path: Path, sector: Any) -> None:
    refused({**as_toml(tmp_path), "sector_class": sector}, "sector_class")


@pytest.mark.parametrize("precision", ["fp64", "FP16", "int4", 16])
def test_unknown_precision_is_refused(tmp_path: Path, precision: Any) -> None:
    refused({**as_toml(tmp_path), "precision": precision}, "precision")


def test_int8_without_calibration_is_refused(tmp_path: Path) -> None:
    message = refused({**as_toml(tmp_path), "precision": "int8"}, "precision")
    assert "calibration" in message
    refused({**as_toml(tmp_path), "precision": "int8", "calibration": ""}, "precision")


@pytest.mark.parametrize("flight_id", ["not-a-uuid", "1234", 42, "0b6f6a3e-8f38-4c1b-9a43"])
def test_flight_id_that_is_not_a_uuid_is_refused(tmp_path: Path, flight_id: Any) -> None:
    refused({**as_toml(tmp_path), "flight_id": flight_id}, "flight_id")


def test_flight_id_is_normalized_to_the_canonical_uuid_form(tmp_path: Path) -> None:
    raw = {**as_toml(tmp_path), "flight_id": uuid.UUID(FLIGHT).hex}
    assert parse_request(raw).flight_id == FLIGHT


@pytest.mark.parametrize(
    "origin",
    [
        [48.45, 35.04],
        [48.45, 35.04, 120.0, 1.0],
        "48.45,35.04",
        [91.0, 35.04, 120.0],
        [-91.0, 35.04, 120.0],
        [48.45, 181.0, 120.0],
        "48.45,-180.5,0",
        "a,b,c",
    ],
)
def test_bad_takeoff_origin_is_refused(tmp_path: Path, origin: Any) -> None:
    refused({**as_toml(tmp_path), "takeoff_origin": origin}, "takeoff_origin")


@pytest.mark.parametrize(
    "field",
    ["corpus", "bbox", "zoom_levels", "sector_class", "backbones", "cache_root", "key", "trust"],
)
def test_missing_required_field_is_refused_naming_it(tmp_path: Path, field: str) -> None:
    raw = as_toml(tmp_path)
    del raw[field]
    refused(raw, field)
    refused({**as_toml(tmp_path), field: None}, field)


def test_path_field_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    refused({**as_toml(tmp_path), "corpus": 3}, "corpus")


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="'zoom'"):
        parse_request({**as_toml(tmp_path), "zoom": [16]})


REQUEST_TOML = """\
corpus = "tiles/corpus.mbtiles"
bbox = [48.44, 35.02, 48.47, 35.07]
zoom_levels = [16, 17]
sector_class = "stable_rear"
backbones = "backbones.toml"
cache_root = "../cache"
key = "{key}"
trust = "trust"
takeoff_origin = [48.45, 35.04, 120.0]
"""


def test_request_file_paths_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "mission"
    folder.mkdir()
    key = tmp_path / "keys" / "operator.key"
    path = folder / "request.toml"
    path.write_text(REQUEST_TOML.format(key=key))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    request = parse_request(read_request_file(path))
    assert request.corpus == folder.resolve() / "tiles" / "corpus.mbtiles"
    assert request.backbones == folder.resolve() / "backbones.toml"
    assert request.trust == folder.resolve() / "trust"
    assert request.cache_root == (tmp_path / "cache").resolve()
    assert request.key == key.resolve()  # absolute paths stay as given
    assert request.sector_class == "stable_rear"
    assert request.takeoff_origin == (48.45, 35.04, 120.0)


def test_request_file_values_match_flag_values(tmp_path: Path) -> None:
    path = tmp_path / "request.toml"
    path.write_text(REQUEST_TOML.format(key=tmp_path / "k"))
    from_file = parse_request(read_request_file(path))
    from_flags = parse_request(
        {
            "corpus": str(tmp_path / "tiles" / "corpus.mbtiles"),
            "bbox": "48.44,35.02,48.47,35.07",
            "zoom_levels": "16,17",
            "sector_class": "stable_rear",
            "backbones": str(tmp_path / "backbones.toml"),
            "cache_root": str(tmp_path / ".." / "cache"),
            "key": str(tmp_path / "k"),
            "trust": str(tmp_path / "trust"),
            "takeoff_origin": "48.45,35.04,120",
        }
    )
    assert from_file == from_flags


def test_request_file_with_unknown_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "request.toml"
    path.write_text(REQUEST_TOML.format(key="k") + 'colour = "red"\n')
    with pytest.raises(InvalidRequestError, match="colour"):
        read_request_file(path)


@pytest.mark.parametrize(
    "text", ["bbox = [48.44, 35.02\n", "zoom_levels = \n", "key = 'a'\nkey = 'b'\n", "[[[\n"]
)
def test_request_file_that_is_not_valid_toml_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "request.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError, match="not valid TOML"):
        read_request_file(path)


def test_request_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "request.toml"
    path.write_bytes(b'corpus = "\xff\xfe"\n')
    with pytest.raises(InvalidRequestError, match="request"):
        read_request_file(path)


def test_missing_request_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="does not exist"):
        read_request_file(tmp_path / "nope.toml")


def test_request_path_that_is_a_folder_is_refused_as_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="request"):
        read_request_file(tmp_path)


# A square of about 1.1 x 0.7 km inside the bbox above, as GeoJSON writes it: [lon, lat].
AREA = {
    "type": "Polygon",
    "coordinates": [
        [[35.04, 48.45], [35.05, 48.45], [35.05, 48.46], [35.04, 48.46], [35.04, 48.45]]
    ],
}


def test_area_from_a_file_a_table_and_a_flag_normalize_identically(tmp_path: Path) -> None:
    import json

    mission = tmp_path / "mission"
    mission.mkdir()
    (mission / "area.geojson").write_text(json.dumps({"type": "Feature", "geometry": AREA}))
    path = mission / "request.toml"
    path.write_text(REQUEST_TOML.format(key=tmp_path / "k") + 'area = "area.geojson"\n')
    from_file = parse_request(read_request_file(path))
    inline = mission / "inline.toml"
    inline.write_text(
        REQUEST_TOML.format(key=tmp_path / "k")
        + "[area]\ntype = 'Polygon'\ncoordinates = "
        + json.dumps(AREA["coordinates"])
        + "\n"
    )
    from_table = parse_request(read_request_file(inline))
    from_flag = parse_request({**read_request_file(inline), "area": str(mission / "area.geojson")})
    assert from_file.area is not None and from_file.area["type"] == "Polygon"
    assert from_file == from_table == from_flag
    # The manifest records the geometry, never the file, and reads back the same.
    recorded = from_file.to_json()
    assert recorded["area"] == from_file.area
    assert parse_request({**read_request_file(path), "area": recorded["area"]}) == from_file


def test_a_request_without_an_area_records_none(tmp_path: Path) -> None:
    request = parse_request(as_toml(tmp_path))
    assert request.area is None
    assert request.to_json()["area"] is None


def test_the_bbox_defaults_to_the_area_bounds(tmp_path: Path) -> None:
    raw = as_toml(tmp_path)
    del raw["bbox"]
    request = parse_request({**raw, "area": AREA})
    assert request.bbox == Bbox(48.45, 35.04, 48.46, 35.05)


@pytest.mark.parametrize(
    "area",
    [
        {"type": "Point", "coordinates": [35.04, 48.45]},
        {"type": "Polygon", "coordinates": [[[200, 48], [201, 48], [201, 49], [200, 48]]]},
        "does-not-exist.geojson",
        42,
    ],
)
def test_a_bad_area_is_refused(tmp_path: Path, area: Any) -> None:
    if isinstance(area, str):
        area = str(tmp_path / area)
    refused({**as_toml(tmp_path), "area": area}, "area")


ROUTE = {"type": "LineString", "coordinates": [[35.03, 48.445, 80.0], [35.06, 48.465, 90.0]]}


def test_a_route_from_a_file_a_table_and_a_flag_is_one_route(tmp_path: Path) -> None:
    import json

    (tmp_path / "route.geojson").write_text(
        json.dumps({"type": "Feature", "geometry": ROUTE, "properties": {}})
    )
    path = tmp_path / "request.toml"
    path.write_text(REQUEST_TOML.format(key=tmp_path / "k") + 'route = "route.geojson"\n')
    from_file = parse_request(read_request_file(path))
    from_table = parse_request({**read_request_file(path), "route": ROUTE})
    assert from_file.route is not None
    assert from_file.route.points == ((48.445, 35.03, 80.0), (48.465, 35.06, 90.0))
    assert from_table == from_file
    # What the manifest records (and the companion receives) reads back as the same route.
    recorded = from_file.to_json()["route"]
    assert recorded == ROUTE
    assert parse_request({**read_request_file(path), "route": recorded}) == from_file


def test_a_request_without_a_route_records_none(tmp_path: Path) -> None:
    request = parse_request(as_toml(tmp_path))
    assert request.route is None and request.to_json()["route"] is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"type": "Polygon", "coordinates": []}, "must be a GeoJSON LineString"),
        ({"type": "LineString", "coordinates": []}, "has no coordinates"),
        ({"type": "LineString", "coordinates": [[35.0, 91.0]]}, "is off the map"),
        ({"type": "LineString", "coordinates": [["35", 48.0]]}, "must be [lon, lat]"),
        ("missing.geojson", "does not exist"),
        (42, "expected a GeoJSON file or object"),
    ],
)
def test_a_bad_route_is_one_line_naming_the_route(tmp_path: Path, value: Any, says: str) -> None:
    if value == "missing.geojson":
        value = str(tmp_path / value)
    message = refused({**as_toml(tmp_path), "route": value}, "route")
    assert says in message and "\n" not in message


def test_a_route_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "route.geojson"
    bad.write_text("{not json")
    assert "is not valid JSON" in refused({**as_toml(tmp_path), "route": str(bad)}, "route")
