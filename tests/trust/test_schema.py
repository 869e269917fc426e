"""The published JSON Schema describes Manifest.json exactly as a build writes it."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from takeoff_cache.errors import VerificationError
from takeoff_cache.trust.manifest import (
    Artifact,
    compose_signed,
    sign_manifest,
    verify_manifest_bytes,
)
from tests.conftest import Demo
from tests.support.factories import new_signer, trust_for


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    text = resources.files("takeoff_cache").joinpath("schema/manifest.schema.json").read_text()
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(validator: Draft202012Validator, doc: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def built_manifest(
    prefect_harness: None, demo_source: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    import shutil

    from takeoff_cache.cli.main import main

    root = tmp_path_factory.mktemp("schema") / "demo"
    shutil.copytree(demo_source, root)
    demo = Demo(root, root / "work")
    assert main(demo.build_args("--expires-in", "7d", "--flight-id", FLIGHT)) == 0
    doc: dict[str, Any] = json.loads((demo.cache / "Manifest.json").read_text())
    return doc


FLIGHT = "0b7e6f1c-2d4a-4e8b-9c3d-5f6a7b8c9d0e"


def test_a_real_build_manifest_validates(
    validator: Draft202012Validator, built_manifest: dict[str, Any]
) -> None:
    assert errors(validator, built_manifest) == []
    kinds = sorted(a["kind"] for a in built_manifest["signed"]["artifacts"])
    assert kinds == ["engine", "engine", "faiss_index", "local_features", "tile_map"]
    assert built_manifest["signed"]["expires_at"] is not None
    assert built_manifest["signed"]["request"]["flight_id"] == FLIGHT
    assert re.fullmatch(r"[0-9a-f-]{36}", built_manifest["signed"]["lineage"])


def test_the_request_records_its_area_or_none(
    validator: Draft202012Validator, built_manifest: dict[str, Any]
) -> None:
    assert built_manifest["signed"]["request"]["area"] is None
    doc = copy.deepcopy(built_manifest)
    ring = [[35.03, 48.44], [35.05, 48.44], [35.05, 48.46], [35.03, 48.44]]
    doc["signed"]["request"]["area"] = {"type": "Polygon", "coordinates": [ring]}
    assert errors(validator, doc) == []
    del doc["signed"]["request"]["area"]  # written before areas existed
    assert errors(validator, doc) == []
    doc["signed"]["request"]["area"] = {"type": "Point", "coordinates": [35.03, 48.44]}
    assert errors(validator, doc) != []


def test_a_manifest_with_calibration_and_a_tensorrt_host_validates(
    validator: Draft202012Validator, built_manifest: dict[str, Any]
) -> None:
    signed = copy.deepcopy(built_manifest["signed"])
    signed["host"] = {
        "backend": "tensorrt",
        "backend_version": "10.3.0",
        "gpu": "Orin",
        "compute_capability": "8.7",
        "cuda_runtime": 12060,
        "cuda_driver": 12060,
        "l4t": "# R36 (release), REVISION: 4.0",
        "cpu": {"arch": "aarch64", "isa": ["asimd", "asimddp"]},
    }
    calibration = Artifact("calibration/0123456789ab.calib.bin", "calibration", 10, "0" * 64, {})
    rebuilt = compose_signed(
        version=3,
        lineage=signed["lineage"],
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        expires_at=None,
        build_identity=signed["build_identity"],
        request={**signed["request"], "precision": "int8", "calibration": "/x/calib.bin"},
        host=signed["host"],
        corpus_fingerprint=signed["corpus"]["fingerprint"],
        tile_count=signed["corpus"]["tile_count"],
        artifacts=[*_artifacts(signed), calibration],
        tool_version="0.1.0",
    )
    doc = json.loads(sign_manifest(rebuilt, new_signer()))
    assert errors(validator, doc) == []


def _artifacts(signed: dict[str, Any]) -> list[Artifact]:
    core = ("path", "kind", "size", "sha256")
    return [
        Artifact(*(a[k] for k in core), {k: v for k, v in a.items() if k not in core})
        for a in signed["artifacts"]
    ]


def _broken(doc: dict[str, Any], edit: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    signed = doc["signed"]
    engine = next(a for a in signed["artifacts"] if a["kind"] == "engine")
    index = next(a for a in signed["artifacts"] if a["kind"] == "faiss_index")
    if edit == "no signatures":
        doc["signatures"] = []
    elif edit == "extra top-level key":
        doc["comment"] = "hi"
    elif edit == "unknown format version":
        signed["format_version"] = 2
    elif edit == "version zero":
        signed["version"] = 0
    elif edit == "version as string":
        signed["version"] = "2"
    elif edit == "local time":
        signed["created_at"] = "2026-01-01T12:00:00+02:00"
    elif edit == "missing build identity":
        del signed["build_identity"]
    elif edit == "lineage not a UUID":
        signed["lineage"] = "cache-1"
    elif edit == "uppercase digest":
        engine["sha256"] = engine["sha256"].upper()
    elif edit == "negative size":
        engine["size"] = -1
    elif edit == "path escaping the cache":
        engine["path"] = "../engines/x.onnx"
    elif edit == "absolute path":
        engine["path"] = "/etc/passwd"
    elif edit == "reserved path":
        engine["path"] = ".staging/x"
    elif edit == "unknown artifact kind":
        engine["kind"] = "model"
    elif edit == "engine without engine key":
        del engine["engine_key"]
    elif edit == "index field on an engine":
        engine["dimension"] = 3
    elif edit == "unknown metric":
        index["metric"] = "l2"
    elif edit == "bbox of three numbers":
        signed["request"]["bbox"] = signed["request"]["bbox"][:3]
    elif edit == "zoom 23":
        signed["request"]["zoom_levels"] = [23]
    elif edit == "gpu fields on a cpu host":
        signed["host"]["gpu"] = "Orin"
    elif edit == "sig not base64 of 64 bytes":
        doc["signatures"][0]["sig"] = "abc"
    else:
        raise AssertionError(edit)
    return doc


@pytest.mark.parametrize(
    "edit",
    [
        "no signatures",
        "extra top-level key",
        "unknown format version",
        "version zero",
        "version as string",
        "local time",
        "missing build identity",
        "lineage not a UUID",
        "uppercase digest",
        "negative size",
        "path escaping the cache",
        "absolute path",
        "reserved path",
        "unknown artifact kind",
        "engine without engine key",
        "index field on an engine",
        "unknown metric",
        "bbox of three numbers",
        "zoom 23",
        "gpu fields on a cpu host",
        "sig not base64 of 64 bytes",
    ],
)
def test_a_broken_manifest_does_not_validate(
    validator: Draft202012Validator, built_manifest: dict[str, Any], edit: str
) -> None:
    assert errors(validator, _broken(built_manifest, edit)) != []


@pytest.mark.parametrize(
    "path",
    [
        "engines/vpr.onnx",
        "a",
        ".hidden/file",
        "a/..b/c",
        "a/b.",
        "../x",
        "a/../x",
        "./x",
        "a/./x",
        "/x",
        "a//b",
        "a/",
        "a\\b",
        "Manifest.json",
        "Manifest.json/x",
        ".staging",
        ".build.lock",
        "sub/Manifest.json",
        "sub/.staging/x",
        ".",
        "..",
        "",
    ],
)
def test_the_schema_and_the_verifier_agree_on_artifact_paths(
    validator: Draft202012Validator, built_manifest: dict[str, Any], path: str
) -> None:
    signer = new_signer()
    signed = copy.deepcopy(built_manifest["signed"])
    signed["artifacts"] = [{**signed["artifacts"][0], "path": path}]
    doc = sign_manifest(signed, signer)
    try:
        verify_manifest_bytes(doc, trust_for(signer))
        accepted = True
    except VerificationError:
        accepted = False
    assert (errors(validator, json.loads(doc)) == []) == accepted


def test_the_schema_ships_with_the_package() -> None:
    root = resources.files("takeoff_cache")
    assert root.joinpath("schema/manifest.schema.json").is_file()
