"""The build identity, field by field: what SPEC §3 step 4 lists changes it, nothing else does.

Every field of the request, of what validate derives from it and of a backbone
is classified below, and the classification is checked against the dataclasses
themselves: a field added later without a decision fails here instead of being
left out of the identity, where a request that differs only in it would end as
a no-op over a cache built for another request.

The inputs are the demo's, validated for real; a path is moved by copying the
same bytes elsewhere and validating again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import numpy_helper

from takeoff_cache.backbones.file import Backbone
from takeoff_cache.backbones.spec import InputSpec
from takeoff_cache.build import identity as identity_module
from takeoff_cache.build.identity import build_identity
from takeoff_cache.build.request import Bbox, BuildRequest, read_request_file
from takeoff_cache.build.validate import ValidatedRequest, validate
from takeoff_cache.demo.synthetic import replace_tile_bytes
from takeoff_cache.engines.onnxruntime import OnnxRuntimeBackend
from takeoff_cache.tiles.area import parse_area, tiles_for_area
from takeoff_cache.tiles.corpus import select_tiles
from takeoff_cache.tiles.route import Route
from tests.conftest import Demo
from tests.support.factories import new_signer, on_another_cpu

Raw = dict[str, Any]
FLIGHT = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def identify(raw: Raw, work_dir: Path | None = None) -> str:
    """The identity a build of ``raw`` computes: validate, select, hash."""
    validated = validate(raw, "onnxruntime", work_dir)
    return identity_for(validated)


def identity_for(validated: ValidatedRequest, fingerprint: str | None = None) -> str:
    if fingerprint is None:
        req = validated.request
        fingerprint = select_tiles(
            req.corpus, req.bbox.as_tuple(), req.zoom_levels, req.area
        ).fingerprint
    return build_identity(validated, fingerprint)


@pytest.fixture
def raw(demo: Demo) -> Raw:
    return read_request_file(demo.request)


@pytest.fixture
def validated(raw: Raw) -> ValidatedRequest:
    return validate(raw, "onnxruntime")


def _origins(origin: tuple[float, float, float] | None) -> list[Any]:
    """No origin, and each of latitude, longitude and altitude on its own."""
    assert origin is not None  # the demo request has one
    lat, lon, alt = origin
    return [None, (lat + 1e-4, lon, alt), (lat, lon + 1e-4, alt), (lat, lon, alt + 1.0)]


# --- Request fields ------------------------------------------------------------------------
#
# Hashed as they are: each entry gives the changed values to try.
REQUEST_CHANGES: dict[str, Callable[[BuildRequest], list[Any]]] = {
    # Each coordinate on its own.
    "bbox": lambda r: [
        replace(r.bbox, **{f.name: getattr(r.bbox, f.name) + 1e-4}) for f in fields(Bbox)
    ],
    "zoom_levels": lambda r: [(16,), (16, 17, 18)],
    "sector_class": lambda r: ["active_conflict"],
    "precision": lambda r: ["fp16", "int8"],
    "takeoff_origin": lambda r: _origins(r.takeoff_origin),
    "flight_id": lambda r: [FLIGHT, "00000000-0000-0000-0000-000000000001"],
    # No area, a corridor, and the same corridor a little wider.
    "area": lambda r: [_corridor(r.bbox), _corridor(r.bbox, 0.12)],
    # A route, the same route one position longer, and one with altitudes.
    "route": lambda r: [
        Route(((r.bbox.lat_min, r.bbox.lon_min), (r.bbox.lat_max, r.bbox.lon_max))),
        Route(
            (
                (r.bbox.lat_min, r.bbox.lon_min),
                (r.bbox.lat_max, r.bbox.lon_max),
                (r.bbox.lat_max, r.bbox.lon_min),
            )
        ),
        Route(((r.bbox.lat_min, r.bbox.lon_min, 80.0), (r.bbox.lat_max, r.bbox.lon_max, 80.0))),
    ],
}


def _corridor(bbox: Bbox, width: float = 0.08) -> dict[str, Any]:
    """A diagonal strip across ``bbox``, ``width`` of its size wide: GeoJSON, [lon, lat]."""
    lat0, lon0, lat1, lon1 = bbox.as_tuple()
    dlat, dlon = (lat1 - lat0) * width, (lon1 - lon0) * width
    ring = [
        [lon0, lat0],
        [lon0 + dlon, lat0],
        [lon1, lat1 - dlat],
        [lon1, lat1],
        [lon1 - dlon, lat1],
        [lon0, lat0 + dlat],
        [lon0, lat0],
    ]
    return parse_area({"type": "Polygon", "coordinates": [ring]}, "test").geojson


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


def _backbones_file(text: str, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return dst


def _move_corpus(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    return raw, {**raw, "corpus": str(_copy(Path(raw["corpus"]), tmp / "elsewhere" / "c.mbtiles"))}


def _move_backbones(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    """The backbones file elsewhere, naming the very same ONNX files."""
    src = Path(raw["backbones"])
    text = src.read_text().replace('onnx = "models/', f'onnx = "{src.parent}/models/')
    return raw, {**raw, "backbones": str(_backbones_file(text, tmp / "elsewhere" / "b.toml"))}


def _move_calibration(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    here = tmp / "calibration.bin"
    here.write_bytes(b"calibration samples")
    there = _copy(here, tmp / "elsewhere" / "samples.bin")
    return {**raw, "calibration": str(here)}, {**raw, "calibration": str(there)}


def _move_cache_root(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    """Another cache root: the no-op check reads that root's own manifest."""
    there = tmp / "another-cache"
    there.mkdir()
    return raw, {**raw, "cache_root": str(there)}


def _move_key(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    return raw, {**raw, "key": str(_copy(Path(raw["key"]), tmp / "keys" / "signing.pem"))}


def _move_trust(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    return raw, {**raw, "trust": str(_copy(Path(raw["trust"]), tmp / "elsewhere" / "trust"))}


# Paths: where the file lies must not matter. Each entry gives a request before and after
# moving the same bytes.
REQUEST_PATHS: dict[str, Callable[[Raw, Path], tuple[Raw, Raw]]] = {
    "corpus": _move_corpus,
    "backbones": _move_backbones,
    "calibration": _move_calibration,
    "cache_root": _move_cache_root,
    "key": _move_key,
    "trust": _move_trust,
}


def _change_corpus(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    """One selected tile with other bytes: a new corpus fingerprint."""
    corpus = _copy(Path(raw["corpus"]), tmp / "changed.mbtiles")
    req = validate(raw, "onnxruntime").request
    tile = select_tiles(corpus, req.bbox.as_tuple(), req.zoom_levels).tiles[0]
    replace_tile_bytes(corpus, tile.z, tile.x, tile.y, b"other tile bytes")
    return raw, {**raw, "corpus": str(corpus)}


def _change_backbone_weights(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    """Same backbones file and ONNX file names, new weights in one model."""
    src = Path(raw["backbones"])
    copy = _copy(src.parent / "models", tmp / "models")
    _backbones_file(src.read_text(), tmp / "backbones.toml")
    model = onnx.load(str(copy / "vpr.onnx"))
    init = model.graph.initializer[0]
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(copy / "vpr.onnx"))
    return raw, {**raw, "backbones": str(tmp / "backbones.toml")}


def _change_calibration(raw: Raw, tmp: Path) -> tuple[Raw, Raw]:
    before, _ = _move_calibration(raw, tmp)
    other = tmp / "other.bin"
    other.write_bytes(b"other calibration samples")
    return before, {**raw, "calibration": str(other)}


# Path fields whose bytes are identity inputs: the corpus through its fingerprint, the
# backbones through each backbone's fields (below) and ONNX SHA-256, the calibration
# through its SHA-256. The others (cache_root, key, trust) must not matter at all.
REQUEST_CONTENT: dict[str, Callable[[Raw, Path], tuple[Raw, Raw]]] = {
    "corpus": _change_corpus,
    "backbones": _change_backbone_weights,
    "calibration": _change_calibration,
}


def test_every_request_field_is_classified() -> None:
    names = {f.name for f in fields(BuildRequest)}
    assert not REQUEST_CHANGES.keys() & REQUEST_PATHS.keys()
    assert names == REQUEST_CHANGES.keys() | REQUEST_PATHS.keys(), (
        "classify each BuildRequest field: hashed as it is (REQUEST_CHANGES)"
        " or a path whose location must not matter (REQUEST_PATHS)"
    )
    assert REQUEST_CONTENT.keys() <= REQUEST_PATHS.keys()


@pytest.mark.parametrize("name", sorted(REQUEST_CHANGES))
def test_a_changed_request_field_changes_the_identity(
    name: str, validated: ValidatedRequest
) -> None:
    fingerprint = "f" * 64  # the same selection: only the field differs
    before = identity_for(validated, fingerprint)
    old = getattr(validated.request, name)
    changes = REQUEST_CHANGES[name](validated.request)
    assert changes and all(value != old for value in changes)
    for value in changes:
        changed = replace(validated, request=replace(validated.request, **{name: value}))
        assert identity_for(changed, fingerprint) != before, f"{name}={value!r}"


@pytest.mark.parametrize("name", sorted(REQUEST_PATHS))
def test_the_same_bytes_at_another_path_keep_the_identity(
    name: str, raw: Raw, tmp_path: Path
) -> None:
    before, after = REQUEST_PATHS[name](raw, tmp_path)
    assert before[name] != after[name]
    assert identify(after) == identify(before)


@pytest.mark.parametrize("name", sorted(REQUEST_CONTENT))
def test_other_bytes_at_a_path_change_the_identity(name: str, raw: Raw, tmp_path: Path) -> None:
    before, after = REQUEST_CONTENT[name](raw, tmp_path)
    assert identify(after) != identify(before)


def test_the_backbones_file_may_name_the_same_onnx_bytes_at_another_path(
    raw: Raw, tmp_path: Path
) -> None:
    src = Path(raw["backbones"])
    models = _copy(src.parent / "models", tmp_path / "weights" / "copied")
    text = src.read_text().replace('onnx = "models/', f'onnx = "{models}/')
    moved = {**raw, "backbones": str(_backbones_file(text, src.parent / "moved.toml"))}
    assert identify(moved) == identify(raw)


def test_a_corridor_area_selects_its_tiles_and_has_its_own_identity(raw: Raw) -> None:
    plain = validate(raw, "onnxruntime")
    corridor = _corridor(plain.request.bbox)
    with_area = validate({**raw, "area": corridor}, "onnxruntime")
    req = with_area.request
    assert req.area == corridor and req.bbox == plain.request.bbox
    bbox_tiles = select_tiles(req.corpus, req.bbox.as_tuple(), req.zoom_levels).tiles
    area_tiles = select_tiles(req.corpus, req.bbox.as_tuple(), req.zoom_levels, req.area).tiles
    assert 0 < len(area_tiles) < len(bbox_tiles) / 2
    assert {(t.z, t.x, t.y) for t in area_tiles} == set(tiles_for_area(corridor, req.zoom_levels))
    assert identity_for(with_area) != identify(raw)


def test_the_same_area_from_a_file_keeps_the_identity(raw: Raw, tmp_path: Path) -> None:
    corridor = _corridor(validate(raw, "onnxruntime").request.bbox)
    for name in ("a.geojson", "elsewhere/b.json"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "type": "FeatureCollection",
                    "features": [
                        {"type": "Feature", "properties": {"name": name}, "geometry": corridor}
                    ],
                }
            )
        )
        assert identify({**raw, "area": str(path)}) == identify({**raw, "area": corridor})


def test_the_work_folder_does_not_matter(raw: Raw, tmp_path: Path) -> None:
    plain = identify(raw)
    assert identify(raw, tmp_path / "work-a") == plain
    assert identify(raw, tmp_path / "work-a") == plain  # the backbones check now remembered
    assert identify(raw, tmp_path / "work-b") == plain


def test_a_remembered_area_keeps_the_identity_and_is_not_normalized_again(
    raw: Raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lat0, lon0, lat1, lon1 = validate(raw, "onnxruntime").request.bbox.as_tuple()
    # Clockwise, from another corner: not yet the normalized form the identity hashes.
    ring = [[lon0, lat0], [lon0, lat1], [lon1, lat1], [lon1, lat0 + 1e-3], [lon0, lat0]]
    polygon = {"type": "Polygon", "coordinates": [ring]}
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps(polygon))
    with_area = {**raw, "area": str(path)}
    plain = identify(with_area)
    work = tmp_path / "work"
    assert identify(with_area, work) == plain  # normalized, and remembered
    monkeypatch.setattr("takeoff_cache.tiles.area.parse_area", _not_again)
    assert identify(with_area, work) == plain
    remembered = validate(with_area, "onnxruntime", work).request.area
    assert remembered == parse_area(polygon, "test").geojson


def _not_again(obj: Any, source: str) -> Any:
    raise AssertionError("an area remembered in the work folder was normalized again")


# --- What validate derives ---------------------------------------------------------------


def _host_changes(host: dict[str, Any]) -> list[dict[str, Any]]:
    cpu = host["cpu"]
    return [
        {**host, "backend": "tensorrt"},
        {**host, "backend_version": host["backend_version"] + ".post1"},
        {**host, "cpu": {**cpu, "arch": "aarch64"}},
        {**host, "cpu": {**cpu, "isa": [*cpu["isa"], "amx_int8"]}},
        {**host, "gpu": "NVIDIA Orin"},
    ]


VALIDATED_CHANGES: dict[str, Callable[[ValidatedRequest], list[Any]]] = {
    "calibration_sha256": lambda v: ["0" * 64, "1" * 64],
    "host": lambda v: _host_changes(v.host),
}
# The request and the backbones are checked field by field; the backend reaches the
# identity through the host identity it reports (its name and version are in it).
VALIDATED_BY_FIELD = ("request", "backbones", "backend")
# Who signs must not matter: a key that the trust store no longer holds fails the no-op
# check's signature verification instead.
VALIDATED_IRRELEVANT: dict[str, Callable[[ValidatedRequest], Any]] = {
    "signer": lambda v: new_signer(),
    "trusted": lambda v: (),
}


def test_every_validated_field_is_classified() -> None:
    names = {f.name for f in fields(ValidatedRequest)}
    groups = [set(VALIDATED_CHANGES), set(VALIDATED_BY_FIELD), set(VALIDATED_IRRELEVANT)]
    assert sum(len(g) for g in groups) == len(set().union(*groups))
    assert names == set().union(*groups)


@pytest.mark.parametrize("name", sorted(VALIDATED_CHANGES))
def test_a_changed_derived_input_changes_the_identity(
    name: str, validated: ValidatedRequest
) -> None:
    before = identity_for(validated, "f" * 64)
    for value in VALIDATED_CHANGES[name](validated):
        assert value != getattr(validated, name)
        changed = replace(validated, **{name: value})
        assert identity_for(changed, "f" * 64) != before, f"{name}={value!r}"


@pytest.mark.parametrize("name", sorted(VALIDATED_IRRELEVANT))
def test_a_derived_value_that_must_not_matter_keeps_the_identity(
    name: str, validated: ValidatedRequest
) -> None:
    changed = replace(validated, **{name: VALIDATED_IRRELEVANT[name](validated)})
    assert identity_for(changed, "f" * 64) == identity_for(validated, "f" * 64)


def test_another_cpu_changes_the_identity(raw: Raw, monkeypatch: pytest.MonkeyPatch) -> None:
    here = identify(raw)
    on_another_cpu(monkeypatch, {"arch": "aarch64", "isa": ["asimd"]})
    assert identify(raw) != here


def test_another_backend_version_changes_the_identity(
    raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = identify(raw)
    monkeypatch.setattr(OnnxRuntimeBackend, "version", property(lambda self: "99.0.0"))
    assert identify(raw) != here


def test_the_corpus_fingerprint_changes_the_identity(validated: ValidatedRequest) -> None:
    assert identity_for(validated, "e" * 64) != identity_for(validated, "f" * 64)


@pytest.mark.parametrize("name", ["MANIFEST_FORMAT", "MANIFEST_FORMAT_VERSION"])
def test_the_manifest_format_changes_the_identity(
    name: str, validated: ValidatedRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = identity_for(validated, "f" * 64)
    old = getattr(identity_module, name)
    monkeypatch.setattr(identity_module, name, old + 1 if isinstance(old, int) else old + "-2")
    assert identity_for(validated, "f" * 64) != before


# --- Each backbone -----------------------------------------------------------------------

BACKBONE_CHANGES: dict[str, Callable[[Backbone], list[Any]]] = {
    "name": lambda b: [b.name + "2"],
    "role": lambda b: [r for r in ("place_recognition", "local_features", "other") if r != b.role],
    "onnx_sha256": lambda b: ["0" * 64],
    "output": lambda b: [o for o in (None, "descriptor", "features") if o != b.output],
}
# The input spec is checked field by field (INPUT_CHANGES); the ONNX path must not
# matter (test_the_backbones_file_may_name_the_same_onnx_bytes_at_another_path); the
# descriptor width is read from the graph, which onnx_sha256 already covers.
BACKBONE_OTHER = ("input", "onnx", "descriptor_width")

INPUT_CHANGES: dict[str, Callable[[InputSpec], list[Any]]] = {
    "name": lambda s: [s.name + "_2"],
    "size": lambda s: [s.size * 2],
    "channels": lambda s: [1 if s.channels == 3 else 3],
    "mean": lambda s: [(s.mean[0] + 0.01, *s.mean[1:]), (*s.mean[:-1], s.mean[-1] + 0.01)],
    "std": lambda s: [(s.std[0] + 0.01, *s.std[1:]), (*s.std[:-1], s.std[-1] + 0.01)],
}


def test_every_backbone_field_is_classified() -> None:
    assert not BACKBONE_CHANGES.keys() & set(BACKBONE_OTHER)
    assert {f.name for f in fields(Backbone)} == BACKBONE_CHANGES.keys() | set(BACKBONE_OTHER)
    assert {f.name for f in fields(InputSpec)} == INPUT_CHANGES.keys()


def _with_backbone(validated: ValidatedRequest, index: int, backbone: Backbone) -> ValidatedRequest:
    backbones = list(validated.backbones)
    backbones[index] = backbone
    return replace(validated, backbones=tuple(backbones))


@pytest.mark.parametrize("name", sorted(BACKBONE_CHANGES))
def test_a_changed_backbone_field_changes_the_identity(
    name: str, validated: ValidatedRequest
) -> None:
    before = identity_for(validated, "f" * 64)
    assert len(validated.backbones) == 2
    for index, backbone in enumerate(validated.backbones):
        for value in BACKBONE_CHANGES[name](backbone):
            assert value != getattr(backbone, name)
            changed = _with_backbone(validated, index, replace(backbone, **{name: value}))
            assert identity_for(changed, "f" * 64) != before, f"{backbone.name}.{name}={value!r}"


@pytest.mark.parametrize("name", sorted(INPUT_CHANGES))
def test_a_changed_input_spec_field_changes_the_identity(
    name: str, validated: ValidatedRequest
) -> None:
    before = identity_for(validated, "f" * 64)
    for index, backbone in enumerate(validated.backbones):
        for value in INPUT_CHANGES[name](backbone.input):
            assert value != getattr(backbone.input, name)
            spec = replace(backbone.input, **{name: value})
            changed = _with_backbone(validated, index, replace(backbone, input=spec))
            assert identity_for(changed, "f" * 64) != before, f"{backbone.name}.input.{name}"


def test_adding_or_dropping_a_backbone_changes_the_identity(validated: ValidatedRequest) -> None:
    before = identity_for(validated, "f" * 64)
    first, second = validated.backbones
    for backbones in [(first,), (second,), (first, second, replace(second, name="more"))]:
        changed = replace(validated, backbones=backbones)
        assert identity_for(changed, "f" * 64) != before
