"""`build`'s readiness verdict: reported always, judged into exit 12 only when asked.

A real build of the demo with a route that runs on past the corpus's tiles:
without a gate it succeeds and signs its not-ready verdict; with
``--require-ready`` the same request (a no-op now) exits 12 naming the holes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from PIL import Image

from takeoff_cache.localize.coverage_map import ROUTE_COLOUR, ROUTE_HOLE_COLOUR
from tests.conftest import Demo
from tests.support.cli import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_build_reports_always_and_gates_only_when_asked(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    lat0, lon0, lat1, lon1 = tomllib.loads(demo.request.read_text())["bbox"]
    # The bbox grows north by half its height, where the corpus has no tiles; the
    # route runs from the middle of the corpus into that strip.
    north = lat1 + (lat1 - lat0) / 2
    route = demo.root / "route.geojson"
    mid_lon = (lon0 + lon1) / 2
    route.write_text(
        json.dumps(
            {
                "type": "LineString",
                "coordinates": [[mid_lon, (lat0 + lat1) / 2], [mid_lon, (lat1 + north) / 2]],
            }
        )
    )
    bbox = f"{lat0},{lon0},{north},{lon1}"
    args = demo.build_args("--bbox", bbox, "--route", str(route), "--self-test", "40", "--json")
    first = run_cli(capsys, *args)
    assert first.code == 0, first.err
    ready = first.json()["ready"]
    assert not ready["ok"] and ready["gated"] is False
    assert ready["route"]["holes_count"] > 0
    assert any(r.startswith("route: ") for r in ready["reasons"])
    signed = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
    assert signed["ready"] == ready
    before = (demo.cache / "Manifest.json").read_bytes()

    gated = run_cli(capsys, *args, "--require-ready")
    assert gated.code == 12, gated.err
    lines = [line for line in gated.err_lines if line.startswith("takeoff-cache: not ready: ")]
    assert [line.removeprefix("takeoff-cache: not ready: ") for line in lines] == ready["reasons"]
    assert gated.json()["ready"]["gated"] is True
    assert (demo.cache / "Manifest.json").read_bytes() == before

    # Without a configured Prefect API the no-op is answered before Prefect starts,
    # with the same verdict: signed as it was, and judged again when it gates.
    plain, gated_here = (
        answered_without_prefect(args),
        answered_without_prefect([*args, "--require-ready"]),
    )
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["outcome"] == "idempotent_no_op"
    assert json.loads(plain.stdout)["ready"] == ready
    assert gated_here.returncode == 12, gated_here.stderr
    assert json.loads(gated_here.stdout)["ready"]["reasons"] == ready["reasons"]
    assert (demo.cache / "Manifest.json").read_bytes() == before

    # --allow-gaps accepts the holes knowingly.
    accepted = run_cli(capsys, *args, "--require-ready", "--allow-gaps")
    assert accepted.code == 0, accepted.err
    assert accepted.json()["ready"]["verdict"] == "ready with gaps"

    # `inspect --png` draws the signed flight: its route and the holes under it.
    png = demo.root / "inspected.png"
    shown = run_cli(capsys, "inspect", str(demo.cache), "--png", str(png))
    assert shown.code == 0, shown.err
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert (pixels == ROUTE_COLOUR).all(axis=-1).sum() > 50
    holes = (
        (abs(pixels[..., 0] - ROUTE_HOLE_COLOUR[0]) < 40)
        & (pixels[..., 1] < 120)
        & (abs(pixels[..., 2] - ROUTE_HOLE_COLOUR[2]) < 60)
    )
    assert holes.sum() > 200


def answered_without_prefect(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    program = "import sys; from takeoff_cache.cli.main import main; code = main(sys.argv[1:]);"
    program += " assert 'prefect' not in sys.modules; sys.exit(code)"
    return subprocess.run(
        [sys.executable, "-c", program, *args], env=env, capture_output=True, text=True, timeout=120
    )
