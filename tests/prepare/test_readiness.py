"""`prepare`'s readiness verdict end to end (SPEC §11): a real tile server on 127.0.0.1
answering 404 under the route, real builds, the weak demo backbone.

- holes under the route: exit 12, one line per reason naming the tiles (z/x/y and
  km from takeoff), and the cache in force is left byte for byte as it was;
- ``--allow-gaps``: ready with the gap stated, in the report and the signed manifest;
- a backbone that cannot localize: exit 12 naming the route's Recall@1, where the
  demo backbone on the same flight and tiles is ready.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from takeoff_cache.core.tilemath import lonlat_to_fractional_tile, tile_center
from takeoff_cache.demo.models import build_weak_vpr_model
from takeoff_cache.tiles.route import Route
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.tileserver import tile_server

pytestmark = pytest.mark.usefixtures("prefect_harness")

# One zoom, a narrow area and a short self-test: a build in seconds.
ARGS = ("--zoom", "16", "--buffer-m", "100", "--self-test", "100")
NOT_READY = "takeoff-cache: not ready: "


def _flight(demo: Demo) -> tuple[Path, Route]:
    """A flight across the demo's area, home first: its JSON file and its route."""
    lat0, lon0, lat1, lon1 = tomllib.loads(demo.request.read_text())["bbox"]
    dlat, dlon = lat1 - lat0, lon1 - lon0
    home = [lat0 + 0.15 * dlat, lon0 + 0.15 * dlon, 0.0]
    path = [
        [lat0 + 0.2 * dlat, lon0 + 0.2 * dlon, 120.0],
        [lat0 + 0.5 * dlat, lon0 + 0.55 * dlon, 120.0],
        [lat0 + 0.8 * dlat, lon0 + 0.8 * dlon, 120.0],
    ]
    flight = demo.root / "flight.json"
    flight.write_text(json.dumps({"planned_home": home, "path": path}))
    return flight, Route(tuple(tuple(p) for p in (home, *path)))


def _request(demo: Demo) -> Path:
    """The demo's request without what prepare decides (corpus, bbox, zoom, origin)."""
    keep = [
        line
        for line in demo.request.read_text().splitlines()
        if not line.startswith(("corpus", "bbox", "zoom_levels", "takeoff_origin", "flight_id"))
    ]
    path = demo.root / "prepare.toml"
    path.write_text("\n".join(keep) + "\n")
    return path


def _prepare(capsys: pytest.CaptureFixture[str], demo: Demo, work: str, *extra: str) -> CliResult:
    flight, _ = _flight(demo)
    return run_cli(
        capsys,
        "prepare",
        "--plan",
        str(flight),
        "--request",
        str(_request(demo)),
        "--work-dir",
        str(demo.root / work),
        *ARGS,
        *extra,
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _under_route(route: Route, count: int) -> list[str]:
    """``count`` distinct z16 tiles the route passes over, away from its ends."""
    out: list[str] = []
    for p in route.sample(25.0):
        if not 0.25 * route.length_km < p.km < 0.75 * route.length_km:
            continue
        fx, fy = lonlat_to_fractional_tile(p.lat, p.lon, 16)
        name = f"16/{math.floor(fx)}/{math.floor(fy)}"
        if name not in out:
            out.append(name)
    assert len(out) >= count, out
    return out[:count]


def test_404s_under_the_route_are_not_ready_naming_them_and_the_cache_stays(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    _, route = _flight(demo)
    holes = _under_route(route, 2)
    # The server's tiles repeat six images: Recall@1 is judged in the last test, not here.
    with tile_server() as server:
        first = _prepare(
            capsys, demo, "work-a", "--tiles-url", server.template, "--min-recall", "0"
        )
        assert first.code == 0, first.err
        before = _snapshot(demo.cache)
        assert "Manifest.json" in before
        server.faults.update({name: ["404"] * 20 for name in holes})
        second = _prepare(
            capsys,
            demo,
            "work-b",
            "--tiles-url",
            server.template,
            "--min-recall",
            "0",
            "--json",
        )
    assert second.code == 12, second.err
    reasons = [line for line in second.err_lines if line.startswith(NOT_READY)]
    (route_line,) = [r for r in reasons if r.startswith(NOT_READY + "route:")]
    ready = second.json()["ready"]
    assert not ready["ok"] and ready["verdict"] == "not ready"
    named = {h["tile"]: h["km"] for h in ready["route"]["holes"]}
    assert set(named) == set(holes)
    for name in holes:
        z, x, y = (int(v) for v in name.split("/"))
        assert named[name] == pytest.approx(route.km_of(*tile_center(z, x, y)), abs=0.01)
        assert f"{name} (km {named[name]:.1f})" in route_line
    # One line a reason, the same reasons the report gives.
    assert [r[len(NOT_READY) :] for r in reasons] == ready["reasons"]
    assert second.json()["exit_code"] == 12 and second.json()["phase"] == "build"
    # The cache in force is the first prepare's, byte for byte.
    assert _snapshot(demo.cache) == before


def test_allow_gaps_is_ready_with_the_gap_stated_and_signed(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    _, route = _flight(demo)
    (hole,) = _under_route(route, 1)
    with tile_server(faults={hole: ["404"] * 20}) as server:
        result = _prepare(
            capsys,
            demo,
            "work",
            "--tiles-url",
            server.template,
            "--min-recall",
            "0",
            "--allow-gaps",
        )
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("ready:"))
    assert lines[head] == "ready:    READY WITH GAPS (accepted with --allow-gaps)"
    assert any(line.startswith("  gap:    route: 1 tile(s)") and hole in line for line in lines)
    signed = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
    assert signed["ready"]["ok"] and signed["ready"]["verdict"] == "ready with gaps"
    assert signed["ready"]["allow_gaps"] is True
    assert [h["tile"] for h in signed["ready"]["route"]["holes"]] == [hole]
    assert signed["request"]["route"]["type"] == "LineString"


def test_a_backbone_that_cannot_localize_is_not_ready_where_the_demo_one_is(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    # Every tile is in the demo's corpus already (no download); at zoom 17 the route
    # crosses enough tiles that a hit is not one of a handful of neighbours.
    corpus = ("--corpus", str(demo.corpus), "--zoom", "17")
    ready = _prepare(capsys, demo, "work-good", *corpus)
    assert ready.code == 0, ready.err
    verdict = [line for line in ready.out.splitlines() if line.startswith("ready:")]
    assert verdict == ["ready:    READY"]
    before = _snapshot(demo.cache)

    build_weak_vpr_model(demo.root / "models" / "weak.onnx")
    backbones = demo.root / "backbones.toml"
    backbones.write_text(backbones.read_text().replace("models/vpr.onnx", "models/weak.onnx"))
    weak = _prepare(capsys, demo, "work-weak", *corpus, "--json")
    assert weak.code == 12, weak.out
    (line,) = [line for line in weak.err_lines if line.startswith(NOT_READY)]
    recall = weak.json()["ready"]["localization"]["recall_at_1"]
    assert weak.json()["ready"]["localization"]["source"] == "route"
    assert line.startswith(
        f"{NOT_READY}localization: route Recall@1 {recall:.2f} is below --min-recall 0.5"
    )
    assert _snapshot(demo.cache) == before
