"""The self-test as a phase of the build: its figures in the report and the signed
manifest, its coverage map, ``--self-test 0`` and the ``--min-recall`` gate."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image
from prefect.artifacts import Artifact

from takeoff_cache.core.tilemath import tms_row
from takeoff_cache.demo.models import build_weak_vpr_model
from takeoff_cache.demo.synthetic import encode_jpeg, render_tile, replace_tile_bytes
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from takeoff_cache_prefect.artifacts import artifact_key
from tests.conftest import Demo
from tests.support.cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

FIGURES = ("k", "recall_at_1", "recall_at_5", "median_error_m")


def signed_of(demo: Demo) -> dict[str, Any]:
    signed: dict[str, Any] = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
    return signed


def use_the_weak_backbone(demo: Demo) -> None:
    build_weak_vpr_model(demo.root / "models" / "weak.onnx")
    toml = demo.root / "backbones.toml"
    toml.write_text(toml.read_text().replace("models/vpr.onnx", "models/weak.onnx"))


def test_the_report_and_the_manifest_carry_the_figures_and_a_rerun_repeats_them(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    result = run_cli(capsys, *demo.build_args("--json"))
    assert result.code == 0, result.err
    report = result.json()
    figures = report["self_test"]
    assert figures["k"] == 80  # every tile of the small corpus, each once
    assert 0.0 <= figures["recall_at_1"] <= figures["recall_at_5"] <= 1.0
    assert figures["median_error_m"] > 0 and figures["seconds"] > 0
    assert report["phases"]["self_test"] > 0

    signed = signed_of(demo)["self_test"]
    assert {name: signed[name] for name in FIGURES} == {name: figures[name] for name in FIGURES}
    assert len(signed["queries"]) == 80
    hits = sum(row[3] == 1 for row in signed["queries"])
    assert hits / 80 == pytest.approx(signed["recall_at_1"], abs=1e-4)
    verify_cache(demo.cache, load_trust_store(demo.trust))  # the figures are signed

    png = Path(report["coverage_map"])
    assert png.parent == demo.work / "maps"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400
    filed = cast(Any, Artifact.get(artifact_key("build-report", demo.cache.resolve())))
    assert "**self-test:** Recall@1" in filed.data
    assert "![coverage map](data:image/png;base64," in filed.data

    # inspect draws the same map from the cache alone: its tile map and the signed queries.
    drawn = tmp_path / "inspected.png"
    inspected = run_cli(capsys, "inspect", str(demo.cache), "--png", str(drawn))
    assert inspected.code == 0, inspected.err
    assert f"coverage map:   {drawn}" in inspected.out
    assert f"Recall@1 {figures['recall_at_1']}" in inspected.out
    with Image.open(drawn) as image:
        assert image.format == "PNG"
        assert 800 <= image.width <= 2000 and 400 <= image.height <= 2000
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20) or []}
    assert (0, 150, 60) in colours or (213, 40, 40) in colours  # hits or misses drawn

    # The same inputs in another cache root and work folder: the same build identity,
    # so the same views and the same figures.
    again = Demo(Path(shutil.copytree(demo.root, tmp_path / "again")), tmp_path / "work-again")
    shutil.rmtree(again.cache)
    again.cache.mkdir()  # the request's paths are relative to its file
    second = run_cli(capsys, *again.build_args("--json"))
    assert second.code == 0, second.err
    assert second.json()["build_identity"] == report["build_identity"]
    assert signed_of(again)["self_test"] == signed_of(demo)["self_test"]


def test_self_test_0_skips_and_a_failed_gate_keeps_the_previous_manifest(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    result = run_cli(capsys, *demo.build_args("--json", "--self-test", "0"))
    assert result.code == 0, result.err
    report = result.json()
    assert report["self_test"] is None and report["coverage_map"] is None
    assert report["phases"].get("self_test", 0.0) < 0.01
    assert "self_test" not in signed_of(demo)
    before = (demo.cache / "Manifest.json").read_bytes()

    use_the_weak_backbone(demo)  # a real rebuild, whose descriptors cannot tell tiles apart
    failed = run_cli(capsys, *demo.build_args("--json", "--min-recall", "0.99"))
    assert failed.code == 3, failed.err
    report = failed.json()
    assert report["outcome"] == "failure"
    assert (
        "Recall@1" in report["failure_reason"]
        and "below the minimum 0.990" in report["failure_reason"]
    )
    assert report["self_test"]["recall_at_1"] < 0.99
    assert "manifest" not in report["phases"]
    assert Path(report["coverage_map"]).is_file()  # drawn for the operator all the same
    assert f"build failed: {report['failure_reason']}" in failed.err
    assert (demo.cache / "Manifest.json").read_bytes() == before
    assert not (demo.cache / ".staging").exists()
    verify_cache(demo.cache, load_trust_store(demo.trust))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--min-recall", "1.5", "min-recall: '1.5' is outside [0, 1]"),
        ("--min-recall", "high", "min-recall: expected a number in [0, 1]"),
        ("--self-test", "-3", "self-test: -3 views is outside"),
        ("--self-test", "2.5", "self-test: expected a whole number of views"),
    ],
)
def test_bad_self_test_options_are_refused_before_any_write(
    capsys: pytest.CaptureFixture[str], demo: Demo, flag: str, value: str, message: str
) -> None:
    result = run_cli(capsys, *demo.build_args(flag, value))
    assert result.code == 2
    assert message in result.err and len(result.err_lines) == 1
    assert not (demo.cache / "Manifest.json").exists()


def test_min_recall_without_a_self_test_is_refused(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    result = run_cli(capsys, *demo.build_args("--self-test", "0", "--min-recall", "0.5"))
    assert result.code == 2
    assert "min-recall: needs the self-test" in result.err


def test_tiles_outside_the_area_change_no_figure_of_one_build_identity(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path
) -> None:
    first = run_cli(capsys, *demo.build_args("--json"))
    assert first.code == 0, first.err
    # The corpus gains the ring of tiles around the area, which views along its edge
    # would straddle; rebuilt into a fresh cache root and work folder.
    again = Demo(Path(shutil.copytree(demo.root, tmp_path / "grown")), tmp_path / "work-grown")
    shutil.rmtree(again.cache)
    again.cache.mkdir()
    held = {(z, x, y) for z, x, y, _ in _tile_rows(again.corpus)}
    ring = {
        (z, x + dx, y + dy)
        for z, x, y in held
        for dx in (-1, 0, 1)
        for dy in (-1, 0, 1)
        if (z, x + dx, y + dy) not in held
    }
    db = sqlite3.connect(again.corpus)
    with db:
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            [(z, x, tms_row(z, y), encode_jpeg(render_tile(z, x, y, 3))) for z, x, y in ring],
        )
    db.close()
    second = run_cli(capsys, *again.build_args("--json"))
    assert second.code == 0, second.err
    assert second.json()["build_identity"] == first.json()["build_identity"]
    assert signed_of(again)["self_test"] == signed_of(demo)["self_test"]


def _tile_rows(path: Path) -> list[tuple[int, int, int, int]]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT zoom_level, tile_column, tile_row, 0 FROM tiles").fetchall()
    finally:
        db.close()
    return [(z, x, (1 << z) - 1 - row, 0) for z, x, row, _ in rows]


def test_a_route_draws_the_views_along_it_and_a_rebuild_reuses_them(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    request = demo.request.read_text()
    lat0, lon0, lat1, lon1 = (
        float(v) for v in request.split("bbox = [")[1].split("]")[0].split(",")
    )
    # Corner to corner, climbing from 100 m to 200 m.
    route = {
        "type": "LineString",
        "coordinates": [
            [lon0 + 0.001, lat0 + 0.001, 100.0],
            [lon1 - 0.001, lat1 - 0.001, 200.0],
        ],
    }
    (demo.root / "route.geojson").write_text(json.dumps(route))
    args = demo.build_args(
        "--json", "--route", str(demo.root / "route.geojson"), "--self-test", "60"
    )
    result = run_cli(capsys, *args)
    assert result.code == 0, result.err
    figures = result.json()["self_test"]
    along = figures["route"]
    assert along["views"] == figures["k"] == 60
    assert set(along) >= {"recall_at_1", "recall_at_5", "median_error_m", "views", "weakest"}
    assert along["recall_at_1"] == figures["recall_at_1"]
    assert along["weakest"] is not None
    assert set(along["weakest"]) == {"from_km", "to_km", "recall_at_1"}
    assert along["weakest"]["recall_at_1"] == min(
        s["recall_at_1"] for s in along["stretches"] if s["views"] >= 5
    )
    assert signed_of(demo)["self_test"]["route"] == along
    assert figures["views_reused"] == 0

    # One tile under the route changed: a rebuild re-embeds the views over it only.
    rows = signed_of(demo)["self_test"]["queries"]
    z, x, y = rows[len(rows) // 2][:3]
    over = sum(r[0] == z and abs(r[1] - x) <= 1 and abs(r[2] - y) <= 1 for r in rows)
    replace_tile_bytes(demo.corpus, z, x, y, encode_jpeg(render_tile(z, x, y, 99)))
    rebuilt = run_cli(capsys, *args)
    assert rebuilt.code == 0, rebuilt.err
    report = rebuilt.json()
    assert report["descriptors_generated"] == 1
    assert report["self_test"]["views_reused"] == 60 - over
    assert [r[:3] for r in signed_of(demo)["self_test"]["queries"]] == [r[:3] for r in rows]
