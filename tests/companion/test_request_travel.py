"""The build the companion runs is this one: every field of REQUEST_FIELDS
travels, each path as the companion's own, and every build option of
OPTION_FIELDS but those kept here for a stated reason, without lists of their
own in the companion's code."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from takeoff_cache.build.options import OPTION_FIELDS, parse_duration
from takeoff_cache.build.request import (
    FIELDS,
    PATH_FIELDS,
    REQUEST_FIELDS,
    Bbox,
    BuildRequest,
    Field,
)
from takeoff_cache.companion import inputs, remote
from takeoff_cache.companion.bringup import CompanionPaths
from takeoff_cache.companion.remote import LOCAL_OPTIONS, option_args
from takeoff_cache.tiles.route import Route

THERE = CompanionPaths("/c/cache", "/c/key.pem", "/c/trust", inputs_dir="/c/inputs")
AREA = {
    "type": "Polygon",
    "coordinates": [[[35.0, 48.0], [35.1, 48.0], [35.1, 48.1], [35.0, 48.0]]],
}


def _request(cls: type[BuildRequest] = BuildRequest) -> BuildRequest:
    """A request with every field set."""
    return cls(
        corpus=Path("/w/corpus.mbtiles"),
        bbox=Bbox(48.0, 35.0, 48.1, 35.1),
        zoom_levels=(16, 17),
        sector_class="stable_rear",
        backbones=Path("/w/backbones.toml"),
        precision="int8",
        calibration=Path("/w/calibration.npz"),
        cache_root=Path("/w/cache"),
        key=Path("/w/key.pem"),
        trust=Path("/w/trust"),
        takeoff_origin=(48.05, 35.05, 120.0),
        flight_id="0f8fad5b-d9cb-469f-a165-70867728950e",
        area=AREA,
        route=Route(((48.01, 35.01, 120.0), (48.09, 35.09, 120.0))),
    )


def test_every_path_field_has_one_way_to_the_companion() -> None:
    ways = [*inputs.INPUT_NAMES, *inputs.COMPANION_OWN, *inputs.INLINE]
    assert len(ways) == len(set(ways)), "a path field with two ways to the companion"
    assert sorted(ways) == sorted(PATH_FIELDS)


def test_every_field_set_reaches_the_companion_with_its_paths_there() -> None:
    request = _request()
    assert all(value is not None for value in request.to_json().values())
    remote = inputs.remote_paths(THERE)
    fields = inputs.companion_fields(request, remote)
    assert list(fields) == list(FIELDS)
    here = request.to_json()
    for name in FIELDS:
        travels_as_path = name in PATH_FIELDS and name not in inputs.INLINE
        assert fields[name] == (remote[name] if travels_as_path else here[name]), name
    assert remote["corpus"] == "/c/inputs/tiles.mbtiles" and remote["key"] == THERE.key
    # The TOML the companion reads holds the same request.
    assert tomllib.loads(inputs.companion_request(request, remote)) == fields


def test_fields_left_unset_stay_unset_there() -> None:
    unset = {
        "calibration": None,
        "takeoff_origin": None,
        "flight_id": None,
        "area": None,
        "route": None,
    }
    bare = replace(_request(), **unset)
    fields = inputs.companion_fields(bare, inputs.remote_paths(THERE))
    assert set(FIELDS) - set(fields) == set(unset)


@dataclass(frozen=True)
class _Grown(BuildRequest):
    """The request as it would be with one field more."""

    new_knob: str = "on"


def test_a_new_field_travels_without_a_change_in_companion_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grown = (*REQUEST_FIELDS, Field("new_knob", "--new-knob", "a field added later"))
    monkeypatch.setattr(inputs, "REQUEST_FIELDS", grown)
    fields = inputs.companion_fields(_request(_Grown), inputs.remote_paths(THERE))
    assert fields["new_knob"] == "on"


def test_a_new_path_field_needs_its_way_to_the_companion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grown = (*REQUEST_FIELDS, Field("new_knob", "--new-knob", "a file added later", path=True))
    monkeypatch.setattr(inputs, "REQUEST_FIELDS", grown)
    with pytest.raises(KeyError, match="new_knob"):
        inputs.companion_fields(_request(_Grown), inputs.remote_paths(THERE))


def test_every_build_option_reaches_the_companion_build_or_stays_here_for_a_reason() -> None:
    options = {
        "work_dir": "/here/work",
        "backend": "onnxruntime",
        "coverage": "lenient",
        "expires_in_s": 129600.0,
        "dask_address": "tcp://10.0.0.2:8786",
        "self_test": 0,
        "min_recall": 0.5,
        "min_coverage": 0.98,
        "allow_gaps": True,
        "require_ready": True,
    }
    assert set(options) == {f.name for f in OPTION_FIELDS}
    args = option_args(options, THERE.work_dir)
    flags = dict(zip(args[::2], args[1::2], strict=True))
    for field in OPTION_FIELDS:
        if field.name in LOCAL_OPTIONS:
            assert field.flag not in flags and LOCAL_OPTIONS[field.name]
        elif field.name == "work_dir":
            assert flags[field.flag] == THERE.work_dir
        else:
            assert flags[field.flag] == str(options[field.name]), field.name
    # The lifetime goes as seconds, which --expires-in reads back as they were.
    assert parse_duration(flags["--expires-in"]) == options["expires_in_s"]


def test_a_new_build_option_reaches_the_companion_build(monkeypatch: pytest.MonkeyPatch) -> None:
    grown = (*OPTION_FIELDS, Field("new_option", "--new-option", "an option added later"))
    monkeypatch.setattr(remote, "OPTION_FIELDS", grown)
    assert remote.option_args({"new_option": "on"}, "/c/work")[-2:] == ["--new-option", "on"]
