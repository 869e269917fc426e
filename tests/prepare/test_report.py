"""The prepare report: its JSON (key order included), its text and its markdown."""

from __future__ import annotations

import json
from typing import Any

from takeoff_cache.build.report import BuildReport
from takeoff_cache.prepare.report import PrepareReport

FLIGHT = {
    "id": "3f2c9e4a-flight",
    "source": "survey_corridor.plan",
    "takeoff_origin": [47.39, 8.54, 0.0],
    "positions": 9,
    "corridors": 1,
    "polygons": 0,
    "circles": 0,
    "points": 0,
}
AREA = {
    "km2": 1.23456,
    "bbox": [8.53, 47.38, 8.56, 47.4],
    "zoom_levels": [16],
    "tiles": 12,
    "tiles_per_zoom": {"16": 12},
}
CORPUS = "/work/tiles/tiles.mbtiles"
DRY_RUN = {
    "dry_run": True,
    "to_fetch": 12,
    "per_zoom": {"16": 12},
    "missing": 12,
    "stale": 0,
    "kept": 0,
    "estimated_bytes": 1234567,
    "over_max_tiles": False,
}
BRING_UP = {
    "target": "pilot@127.0.0.1:2222",
    "version": "0.2.0",
    "backend": "onnxruntime",
    "backend_version": "1.18.0",
    "host_tag": "linux-x86_64",
    "host_identity": "SHA256:abc",
}
TRANSFER = {"bytes_sent": 123456, "files_sent": 4, "bytes_skipped": 0, "elapsed_s": 0.5}
VERIFY = {"ok": True, "version": 1, "build_identity": "b1d", "artifacts": 7}


def build_json() -> dict[str, Any]:
    built = BuildReport("success", tiles=12, build_identity="b1d", manifest_path="/c/Manifest.json")
    return built.to_json()


def companion_run() -> PrepareReport:
    """A report as the flow fills it for ``prepare --companion``, phase by phase."""
    report = PrepareReport()
    report.phases["resolve"] = 0.01
    report.flight, report.area, report.corpus = FLIGHT, AREA, CORPUS
    report.phases.update(lock=0.0, download=0.2)
    report.lock = "/work/locks/prepare-0123.lock"
    report.download = {"source": None, "missing": 0, "missing_tiles": []}
    report.area = {**AREA, "path": "/work/areas/3f2c9e4a-flight.geojson"}
    report.phases["companion"] = 9.5
    report.companion = {"bring_up": BRING_UP, "transfer": TRANSFER}
    report.build, report.verify = build_json(), VERIFY
    report.finish("success")
    return report


def test_a_report_comes_back_from_its_json_with_its_keys_in_order() -> None:
    report = companion_run()
    doc = json.loads(json.dumps(report.to_json()))
    assert PrepareReport.from_json(doc) == report
    assert json.dumps(PrepareReport.from_json(doc).to_json()) == json.dumps(report.to_json())
    assert list(doc) == [
        "outcome", "phase", "phases", "flight", "area", "corpus", "lock", "download",
        "companion", "build", "verify", "exit_code",
    ]  # fmt: skip


def test_what_no_phase_reached_is_absent_not_null() -> None:
    assert PrepareReport().to_json() == {"outcome": None, "phase": "resolve"}
    report = PrepareReport()
    report.fail(9, "flight: not a plan")
    assert json.dumps(report.to_json()) == (
        '{"outcome": "failure", "phase": "resolve", "exit_code": 9, "error": "flight: not a plan"}'
    )


def test_a_dry_run_reads_as_its_estimate() -> None:
    report = PrepareReport(flight=FLIGHT, area=AREA, corpus=CORPUS, phase="download")
    report.download, report.outcome = DRY_RUN, "dry_run"
    assert list(report.to_json()) == ["outcome", "phase", "flight", "area", "corpus", "download"]
    assert report.text() == (
        "flight:   3f2c9e4a-flight\n"
        "area:     1.23 km², 12 tiles (z16 12)\n"
        "corpus:   /work/tiles/tiles.mbtiles\n"
        "dry run:  12 tiles to fetch (z16 12), about 1,234,567 bytes; nothing fetched"
    )


def test_a_failure_names_the_phase_that_stopped() -> None:
    report = PrepareReport(flight={**FLIGHT, "id": None}, area=AREA, corpus=CORPUS)
    report.phase = "lock"
    report.fail(4, "lock: another prepare of /work/tiles/tiles.mbtiles holds it")
    assert report.subject() == "survey_corridor.plan"
    assert report.text().splitlines()[-1] == (
        "stopped:  lock: lock: another prepare of /work/tiles/tiles.mbtiles holds it"
    )
    assert report.markdown() == (
        f"# Prepare: survey_corridor.plan — failure\n\n```\n{report.text()}\n```\n"
    )
    early = PrepareReport()
    early.fail(9, "flight: not a plan")
    assert early.subject() == "flight"
    assert early.text() == "stopped:  resolve: flight: not a plan"


def test_a_companion_run_reads_as_bring_up_transfer_build_verify() -> None:
    report = companion_run()
    build = BuildReport.from_json(report.build or {}).text()
    assert report.text() == "\n".join(
        [
            "flight:   3f2c9e4a-flight",
            "area:     1.23 km², 12 tiles (z16 12)",
            "corpus:   /work/tiles/tiles.mbtiles",
            "missing:  0 tiles of the area are not in the corpus",
            "companion: pilot@127.0.0.1:2222: takeoff-cache 0.2.0, onnxruntime 1.18.0"
            " (linux-x86_64)",
            "transfer: 123,456 bytes sent in 4 files, 0 already there, 0.50 s",
            build,
            "verify:   ok (manifest version 1)",
        ]
    )
    assert report.markdown().startswith("# Prepare: 3f2c9e4a-flight — success\n\n```\n")


def test_keys_a_newer_worker_or_companion_adds_are_tolerated() -> None:
    doc = companion_run().to_json()
    doc["build"] = {**doc["build"], "gpu_seconds": 3.5}
    newer = {**doc, "weather": {"wind_mps": 4}, "phase_started_at": "2025-01-01T00:00:00Z"}
    report = PrepareReport.from_json(newer)
    assert "weather" not in report.to_json() and report.outcome == "success"
    assert report.build is not None and report.build["gpu_seconds"] == 3.5  # the build's, kept
    assert "verify:   ok" in report.text()


NOT_READY = {
    "ok": False,
    "verdict": "not ready",
    "reasons": [
        "route: 2 tile(s) under the route missing (z16: 2; km 1.2-1.4): 16/39180/22640 (km 1.2),"
        " 16/39181/22640 (km 1.4); fetch them, or accept them with --allow-gaps"
    ],
    "gaps": [],
    "notes": [],
    "gated": True,
    "allow_gaps": False,
    "min_coverage": 0.98,
    "min_recall": 0.5,
    "coverage": {
        "needed": 12,
        "present": 10,
        "fraction": 0.8333,
        "per_zoom": {"16": {"needed": 12, "present": 10, "fraction": 0.8333}},
    },
    "route": {"length_km": 2.5, "footprint_m": 150.0, "tiles": 6, "holes_count": 2},
    "localization": None,
}


def test_the_verdict_comes_first_and_a_not_ready_stop_points_at_it() -> None:
    report = companion_run()
    report.ready, report.phase = NOT_READY, "build"
    report.fail(12, "not ready: " + NOT_READY["reasons"][0])  # type: ignore[index]
    lines = report.text().splitlines()
    assert lines[:5] == [
        "ready:    NOT READY: 1 reason(s)",
        "  reason: " + NOT_READY["reasons"][0],  # type: ignore[index]
        "  area:   z16 10/12 (83.3%) (minimum 98% a zoom)",
        "  route:  2.5 km, 6 tiles within 150 m of it, 2 missing",
        "flight:   3f2c9e4a-flight",
    ]
    assert lines[-1] == (
        "stopped:  build: not ready (the reasons above); the previous cache stays in force"
    )
    # The build's own text inside does not repeat the verdict.
    assert sum(line.startswith("ready:") for line in lines) == 1
    assert list(report.to_json())[:2] == ["outcome", "ready"]
    assert "NOT READY" in report.markdown()


def test_the_registered_figures_have_their_own_line_beside_the_self_tests() -> None:
    registered = {
        "k": 50,
        "registered_share": 0.98,
        "recall_at_1": 0.98,
        "median_error_m": 0.19,
        "p90_error_m": 0.58,
        "median_sigma_m": 0.4,
        "within_2_sigma": 0.9,
        "seconds": 0.21,
        "views_reused": 47,
    }
    self_test = {"recall_at_1": 0.75, "recall_at_5": 0.93, "median_error_m": 53.0, "k": 200}
    report = BuildReport(outcome="success", self_test={**self_test, "registered": registered})
    line = next(x for x in report.text().splitlines() if x.startswith("registered:"))
    assert line.split(None, 1)[1] == (
        "Recall@1 0.980 after re-ranking, median error 0.2 m, p90 0.6 m,"
        " 98% of 50 views registered, median 1-sigma 0.4 m (47 kept, 0.21s)"
    )
    assert "**registered:** Recall@1 0.980" in report.markdown()
    # Without local features there is no such line; with none registered, no sigma.
    assert "registered:" not in BuildReport(outcome="success", self_test=self_test).text()
    none = {**registered, "registered_share": 0.0, "median_sigma_m": None}
    text = BuildReport(outcome="success", self_test={**self_test, "registered": none}).text()
    assert "0% of 50 views registered (47 kept" in text
