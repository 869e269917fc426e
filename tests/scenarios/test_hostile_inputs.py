"""Hostile inputs that describe an area are refused cheaply, each with its documented
exit code and one line: documents nested 100 000 deep or larger than their limit,
FIFOs and devices given as files, huge radii and buffers, non-finite coordinates,
a continent under --max-tiles, point buffers astride the antimeridian.

Each class goes through the command line as an operator would give it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from takeoff_cache.core.documents import (
    MAX_AREA_BYTES,
    MAX_BACKBONES_BYTES,
    MAX_DEPTH,
    MAX_FLIGHT_BYTES,
)
from takeoff_cache.errors import EXIT_DOWNLOAD, EXIT_RESOLVE
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli

DEEP = 100_000
FLIGHT_ID = "6f1c2a8e-5d0b-4b9e-9a51-2f1d7c3e8b40"


def refused(result: CliResult, code: int, *words: str) -> None:
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err + result.out
    assert len(result.err_lines) == 1, result.err
    for word in words:
        assert word in result.err_lines[0], result.err_lines[0]


def deep_json(prefix: bytes, depth: int = DEEP) -> bytes:
    return prefix + b"[" * depth + b"]" * depth + b"}"


def survey_plan(ring: list[list[float]], rally: list[list[float]] | None = None) -> bytes:
    survey = {"type": "ComplexItem", "complexItemType": "survey", "polygon": ring}
    plan = {
        "fileType": "Plan",
        "mission": {"items": [survey], "plannedHomePosition": [*ring[0], 100.0]},
        "rallyPoints": {"points": rally or []},
    }
    return json.dumps(plan).encode()


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    yield path


# --------------------------------------------------------------------------- flights: exit 9


def prepare(capsys: pytest.CaptureFixture[str], demo: Demo, *argv: str) -> CliResult:
    return run_cli(capsys, "prepare", "--work-dir", str(demo.work), "--zoom", "16", *argv)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (deep_json(b'{"fileType": "Plan", "mission": '), ["flight", f"deeper than {MAX_DEPTH}"]),
        (deep_json(b'{"points": '), ["flight", f"deeper than {MAX_DEPTH}"]),
        (
            b'{"fileType": "Plan", "mission": {"items": []}, "pad": "'
            + b"x" * MAX_FLIGHT_BYTES
            + b'"}',
            ["flight", f"larger than {MAX_FLIGHT_BYTES:,} bytes"],
        ),
        (b'{"points": [[Infinity, 10.0]]}', ["flight", "off the globe"]),
        (
            b'{"points": [[-33.9, -70.6]], "circles": [{"center": [-33.9, -70.6],'
            b' "radius_m": 1e300}]}',
            ["flight", "at most 1,000,000 m"],
        ),
        (
            json.dumps(
                {
                    "fileType": "Plan",
                    "mission": {"items": []},
                    "geoFence": {
                        "circles": [
                            {
                                "inclusion": True,
                                "circle": {"center": [-12.0, -77.0], "radius": 1e300},
                            }
                        ]
                    },
                }
            ).encode(),
            ["flight", "circle 1", "at most 1,000,000 m"],
        ),
        (
            survey_plan(
                [[-16.6, 179.0], [-16.6, 179.1], [-16.5, 179.1]],
                rally=[[-16.5, 179.999, 0.0], [-16.5, -179.999, 0.0]],
            ),
            ["area", "crosses the antimeridian"],
        ),
    ],
    ids=[
        "plan-deep",
        "flight-deep",
        "plan-large",
        "infinite",
        "radius-json",
        "radius-plan",
        "antimeridian-points",
    ],
)
def test_a_hostile_flight_document_exits_9_with_one_line(
    capsys: pytest.CaptureFixture[str],
    demo: Demo,
    tmp_path: Path,
    content: bytes,
    words: list[str],
) -> None:
    plan = tmp_path / "hostile.plan"
    plan.write_bytes(content)
    refused(prepare(capsys, demo, "--plan", str(plan), "--dry-run"), EXIT_RESOLVE, *words)
    assert not demo.work.exists()


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_plan_that_is_a_device_or_fifo_is_refused_at_once(
    capsys: pytest.CaptureFixture[str], demo: Demo, fifo: Path, special: str
) -> None:
    path = str(fifo) if special == "fifo" else special
    started = time.monotonic()
    result = prepare(capsys, demo, "--plan", path, "--dry-run")
    refused(result, EXIT_RESOLVE, "flight", "FIFO, socket or device, not a file")
    assert time.monotonic() - started < 10  # a hang guard: nothing was read or waited on


class _DeepFlights(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = deep_json(b'{"path": ')
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_deeply_nested_flights_api_answer_exits_9(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DeepFlights)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = prepare(capsys, demo, "--flight-id", FLIGHT_ID, "--flights-api", url, "--dry-run")
    finally:
        server.shutdown()
        server.server_close()
    refused(result, EXIT_RESOLVE, "flights API", f"deeper than {MAX_DEPTH}")


@pytest.mark.parametrize("buffer_m", ["1e300", "nan", "inf"])
def test_a_buffer_out_of_range_exits_2(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path, buffer_m: str
) -> None:
    plan = tmp_path / "small.plan"
    plan.write_bytes(survey_plan([[-33.90, -70.60], [-33.90, -70.59], [-33.89, -70.59]]))
    result = prepare(capsys, demo, "--plan", str(plan), "--buffer-m", buffer_m, "--dry-run")
    refused(result, 2, "buffer")


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_continent_is_refused_from_its_geometry_before_any_tile_is_listed(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path, dry_run: bool
) -> None:
    # About 2,000 km a side in the southern and western hemispheres: 10**8 tiles at z17.
    plan = tmp_path / "continent.plan"
    plan.write_bytes(survey_plan([[-40.0, -70.0], [-40.0, -45.0], [-22.0, -45.0], [-22.0, -70.0]]))
    # Without --dry-run, the rest of the request (key, trust, cache root) is checked first.
    text = "\n".join(
        line
        for line in demo.request.read_text().splitlines()
        if not line.startswith(("corpus", "bbox", "zoom_levels", "takeoff_origin", "flight_id"))
    )
    request = demo.root / "prepare.toml"
    request.write_text(text + "\n")
    tiles = ["--request", str(request), "--tiles-url", "http://127.0.0.1:9/{z}/{x}/{y}.jpg"]
    extra = ["--dry-run"] if dry_run else tiles
    started = time.monotonic()
    result = run_cli(
        capsys, "prepare", "--work-dir", str(demo.work), "--zoom", "17", "--plan", str(plan),
        "--max-tiles", "50000", *extra,
    )  # fmt: skip
    assert time.monotonic() - started < 30  # a hang guard; listing took 80 s and 6 GB
    refused(result, EXIT_DOWNLOAD, "at least", "tiles to fetch, more than max_tiles 50,000")
    assert not demo.work.exists()


# --------------------------------------------------------------------------- requests: exit 2


def build(capsys: pytest.CaptureFixture[str], demo: Demo, *extra: str) -> CliResult:
    return run_cli(capsys, *demo.build_args(*extra))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (deep_json(b'{"type": "Polygon", "coordinates": '), [f"deeper than {MAX_DEPTH}"]),
        (
            deep_json(b'{"type": "Polygon", "coordinates": ', MAX_DEPTH + 1),
            [f"deeper than {MAX_DEPTH}"],
        ),
        (
            b'{"type": "Polygon", "coordinates": [], "pad": "' + b"x" * MAX_AREA_BYTES + b'"}',
            [f"larger than {MAX_AREA_BYTES:,} bytes"],
        ),
        (
            b'{"type": "Polygon", "coordinates": [[[35.0, 48.4], [NaN, 48.5], [35.1, 48.5],'
            b" [35.0, 48.4]]]}",
            ["non-finite"],
        ),
    ],
    ids=["deep", "just-too-deep", "large", "nan"],
)
def test_a_hostile_area_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], demo: Demo, tmp_path: Path, content: bytes, words: list[str]
) -> None:
    area = tmp_path / "area.geojson"
    area.write_bytes(content)
    refused(build(capsys, demo, "--area", str(area)), 2, "area", *words)
    assert sorted(demo.cache.iterdir()) == []


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
@pytest.mark.parametrize("flag", ["--area", "--request", "--backbones"])
def test_request_files_that_are_devices_or_fifos_exit_2_at_once(
    capsys: pytest.CaptureFixture[str], demo: Demo, fifo: Path, flag: str, special: str
) -> None:
    path = str(fifo) if special == "fifo" else special
    started = time.monotonic()
    result = run_cli(capsys, "build", "--request", str(demo.request), flag, path,
                     "--work-dir", str(demo.work))  # fmt: skip
    if flag == "--request":  # the request given last is the one read
        result = run_cli(capsys, "build", flag, path, "--work-dir", str(demo.work))
    refused(result, 2, "FIFO, socket or device, not a file")
    assert time.monotonic() - started < 10  # a hang guard


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("request", "bbox = " + "[" * DEEP + "]" * DEEP + "\n", [f"deeper than {MAX_DEPTH}"]),
        ("request", "bbox = " + "[" * 200 + "]" * 200 + "\n", [f"deeper than {MAX_DEPTH}"]),
        (
            "backbones",
            "[[backbone]]\nname = " + "[" * DEEP + "]" * DEEP + "\n",
            [f"deeper than {MAX_DEPTH}"],
        ),
        (
            "backbones",
            "[[backbone]]\nname = 'vpr'\n# " + "x" * MAX_BACKBONES_BYTES + "\n",
            [f"larger than {MAX_BACKBONES_BYTES:,} bytes"],
        ),
    ],
    ids=["request-deep", "request-200", "backbones-deep", "backbones-large"],
)
def test_hostile_toml_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    demo: Demo,
    tmp_path: Path,
    name: str,
    content: str,
    words: list[str],
) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(content)
    if name == "request":
        result = run_cli(capsys, "build", "--request", str(path), "--work-dir", str(demo.work))
    else:
        result = build(capsys, demo, "--backbones", str(path))
    refused(result, 2, name, *words)
    assert sorted(demo.cache.iterdir()) == []


# --------------------------------------------------------------------------- locate: exit 2


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_locate_refuses_an_image_that_is_a_device_or_fifo_at_once(
    capsys: pytest.CaptureFixture[str], demo: Demo, fifo: Path, special: str
) -> None:
    path = str(fifo) if special == "fifo" else special
    started = time.monotonic()
    result = run_cli(capsys, "locate", str(demo.cache), path, "--trust", str(demo.trust))
    refused(result, 2, "image", "FIFO, socket or device, not a file")
    assert time.monotonic() - started < 10  # a hang guard
