"""Flights from QGroundControl plans, WPL files, JSON flight files and a real flights API."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.errors import (
    EXIT_RESOLVE,
    AntimeridianError,
    FlightError,
    FlightFileError,
    FlightNotFoundError,
    FlightsAuthError,
    FlightsUnreachableError,
    InvalidRequestError,
    MalformedFlightError,
    NoPositionError,
    NotAPlanError,
)
from takeoff_cache.prepare.flight import Circle, Corridor, Flight
from takeoff_cache.prepare.sources import fetch_flight, load_flight, parse_flight

DATA = Path(__file__).parents[1] / "data" / "flights"
FLIGHT_ID = "6f1c2a8e-5d0b-4b9e-9a51-2f1d7c3e8b40"
TOKEN = "tok-Hq71-secret-bearer"


def plan(items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    mission = {"items": items, "plannedHomePosition": [48.45, 35.04, 100.0], "version": 2}
    return {"fileType": "Plan", "groundStation": "QGroundControl", "mission": mission, **extra}


def waypoint(lat: Any, lon: Any, frame: int = 3, command: int = 16) -> dict[str, Any]:
    params = [0, 0, 0, None, lat, lon, 50]
    return {"type": "SimpleItem", "command": command, "frame": frame, "params": params}


def write(tmp_path: Path, text: str, name: str = "f.plan") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- .plan


def test_a_qgroundcontrol_plan_gives_path_polygons_corridor_fence_and_rally_points() -> None:
    flight = load_flight(DATA / "survey_corridor.plan")
    assert flight.planned_home == (48.4502, 35.0401, 112.0)
    # Takeoff, the waypoint, the survey's and the corridor's flown items, the landing;
    # the null, 0,0 and local-frame waypoints are skipped.
    assert [p[:2] for p in flight.positions] == [
        (48.4506, 35.0405),
        (48.455, 35.045),
        (48.46, 35.05),
        (48.46, 35.06),
        (48.462, 35.06),
        (48.462, 35.05),
        (48.465, 35.065),
        (48.48, 35.1),
        (48.447, 35.03),
        (48.4505, 35.0398),
    ]
    assert flight.corridors == (Corridor(((48.465, 35.065), (48.48, 35.1)), 60.0),)
    survey, structure, fence = flight.polygons
    assert survey[0] == (48.4595, 35.0495) and len(survey) == 4
    assert structure[0] == (48.481, 35.101)
    assert fence[0] == (48.43, 35.0)  # the exclusion polygon adds nothing
    assert flight.circles == (Circle((48.447, 35.03), 75.0), Circle((48.44, 35.02), 150.0))
    assert flight.points == ((48.458, 35.07, 0.0), (48.451, 35.042, 50.0), (48.452, 35.043, 50.0))
    assert flight.id is None and flight.takeoff_origin == flight.planned_home


def test_plan_items_without_a_usable_location_are_skipped(tmp_path: Path) -> None:
    text = json.dumps(
        plan(
            [
                waypoint(float("nan"), float("nan")),
                waypoint(None, None),
                waypoint(0, 0),
                waypoint(10.0, 20.0, frame=1),  # local NED
                waypoint(10.0, 20.0, frame=2),  # mission frame
                waypoint(10.0, 20.0, command=20),  # RTL carries no position
                waypoint(48.46, 35.05, frame=6),  # global relative alt, int
            ]
        )
    )
    assert "NaN" in text  # as Python's json and QGroundControl's older files write it
    flight = load_flight(write(tmp_path, text))
    assert flight.positions == ((48.46, 35.05, 50.0),)


def test_a_plan_with_no_position_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(plan([waypoint(0, 0), waypoint(None, None, frame=2)])))
    with pytest.raises(NoPositionError, match="names no global position") as info:
        load_flight(path)
    assert info.value.exit_code == EXIT_RESOLVE == 9


def test_a_coordinate_off_the_globe_is_malformed(tmp_path: Path) -> None:
    with pytest.raises(MalformedFlightError, match=r"mission item 1.*off the globe"):
        load_flight(write(tmp_path, json.dumps(plan([waypoint(95.0, 35.0)]))))


def test_a_plan_across_the_antimeridian_is_refused(tmp_path: Path) -> None:
    items = [waypoint(-16.5, 179.9), waypoint(-16.6, -179.9)]
    with pytest.raises(AntimeridianError, match="crosses the antimeridian"):
        load_flight(write(tmp_path, json.dumps(plan(items))))


# --------------------------------------------------------------------------- WPL


def test_a_wpl_110_file_gives_home_and_waypoints() -> None:
    flight = load_flight(DATA / "mission.waypoints")
    assert flight.planned_home == (-35.363262, 149.165237, 584.090027)
    assert flight.positions == (
        (-35.361354, 149.165218, 20.0),
        (-35.359467, 149.161146, 50.0),
        (-35.366512, 149.162586, 50.0),
    )


def test_wpl_120_and_space_separated_columns_read_the_same(tmp_path: Path) -> None:
    text = "QGC WPL 120\n0 0 3 16 0 0 0 0 47.39 8.54 20 1\n"
    assert load_flight(write(tmp_path, text, "m.txt")).positions == ((47.39, 8.54, 20.0),)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("QGC WPL 100\n", NotAPlanError, "QGC WPL 110 or 120"),
        (
            "QGC WPL 110\n0\t0\t3\t16\t0\t0\t0\t47.39\t8.54\t20\t1\n",
            FlightFileError,
            "line 2: 11 col",
        ),
        ("QGC WPL 110\n0\t0\t3\t16\t0\t0\t0\t0\tnorth\t8.54\t20\t1\n", FlightFileError, "line 2"),
    ],
)
def test_bad_wpl_files_are_named(
    tmp_path: Path, text: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        load_flight(write(tmp_path, text, "m.waypoints"))


# --------------------------------------------------------------------------- JSON flight files


def test_a_json_flight_file_reads_in_the_southern_and_western_hemispheres() -> None:
    flight = load_flight(DATA / "flight.json")
    assert flight.id == FLIGHT_ID
    assert flight.planned_home == (-22.9519, -43.2105, 700.0)
    assert flight.positions[2] == (-22.93, -43.195)
    assert flight.corridors[0].width_m == 120.0
    assert flight.circles == (Circle((-22.95, -43.2), 300.0),)
    assert parse_flight(json.dumps(flight.to_json()).encode(), "again") == Flight(
        **{**flight.__dict__, "source": "again"}
    )


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"path": [[48.4, "35.0"]]}, r"'path\[0\]'"),
        (
            {"path": [[48.4, 35.0]], "corridors": [{"line": [[48.4, 35.0]], "width_m": 10}]},
            "at least 2",
        ),
        (
            {"path": [[48.4, 35.0]], "circles": [{"center": [48.4, 35.0], "radius_m": -1}]},
            "radius_m",
        ),
        ({"path": [[48.4, 200.0]]}, "off the globe"),
        ({"path": {"a": 1}}, "'path' must be a list"),
        ({"id": 7, "path": [[48.4, 35.0]]}, "'id' must be a string"),
    ],
)
def test_malformed_json_flights_are_named(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(MalformedFlightError, match=match):
        parse_flight(json.dumps(obj).encode(), "f.json")


# --------------------------------------------------------------------------- telling files apart


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b'{"fileType": "Plan", "mission": ', FlightFileError, "not valid JSON"),
        (b'{"type": "FeatureCollection", "features": []}', NotAPlanError, "neither"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", NotAPlanError, "binary"),
        (b"latitude,longitude\n48.4,35.0\n", NotAPlanError, "not a flight plan"),
        (b'{"fileType": "Plan", "mission": []}', MalformedFlightError, "mission"),
    ],
)
def test_files_that_are_not_flights_say_why(
    data: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        parse_flight(data, "x")


def test_a_missing_file_is_a_resolve_error(tmp_path: Path) -> None:
    with pytest.raises(FlightFileError, match="does not exist") as info:
        load_flight(tmp_path / "nope.plan")
    assert isinstance(info.value, FileNotFoundError | OSError) and info.value.exit_code == 9


# --------------------------------------------------------------------------- flights API


class _Api:
    def __init__(self) -> None:
        self.mode = "ok"
        self.seen: list[dict[str, str]] = []


@pytest.fixture
def api() -> Iterator[tuple[str, _Api]]:
    state = _Api()
    body = (DATA / "flight.json").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.seen.append({"path": self.path, **dict(self.headers.items())})
            mode = state.mode
            if mode == "slow":
                time.sleep(1.5)
            if mode == "drip":
                return self._drip(body)
            if self.path != f"/v1/flights/{FLIGHT_ID}" or mode == "404":
                return self._answer(404, b'{"error": "not found"}')
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._answer(401, b'{"error": "unauthorized"}')
            answers = {
                "403": (403, b"{}"),
                "500": (500, b"oops"),
                "html": (200, b"<html>maintenance</html>"),
                "list": (200, b"[1, 2]"),
                "huge": (200, b'{"id": "' + b"x" * (9 << 20) + b'"}'),
                "other": (
                    200,
                    json.dumps(
                        {"id": "00000000-0000-4000-8000-000000000000", "points": [[1, 2]]}
                    ).encode(),
                ),
            }
            self._answer(*answers.get(mode, (200, body)))

        def _drip(self, data: bytes) -> None:
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _answer(self, status: int, data: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()


def test_the_flights_api_answers_a_flight_with_the_bearer_token(
    api: tuple[str, _Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = api
    monkeypatch.setenv("TAKEOFF_CACHE_FLIGHTS_TOKEN", TOKEN)
    flight = fetch_flight(url + "/", FLIGHT_ID)
    from_file = load_flight(DATA / "flight.json")
    assert flight.to_json() == from_file.to_json()
    assert flight.source == f"{url}/flights/{FLIGHT_ID}"
    assert state.seen[0]["Authorization"] == f"Bearer {TOKEN}"
    assert state.seen[0]["User-Agent"].startswith("takeoff-cache/")
    # The operator's contact goes to the flights API too, as to tile servers.
    monkeypatch.setenv("TAKEOFF_CACHE_CONTACT", "ops@example.org")
    fetch_flight(url, FLIGHT_ID)
    assert state.seen[-1]["User-Agent"].endswith("(+ops@example.org)")


@pytest.mark.parametrize(
    ("mode", "token", "error", "match"),
    [
        ("404", TOKEN, FlightNotFoundError, f"no flight {FLIGHT_ID}"),
        ("ok", None, FlightsAuthError, "HTTP 401; no token given"),
        ("ok", "wrong", FlightsAuthError, "HTTP 401; the token was refused"),
        ("403", TOKEN, FlightsAuthError, "HTTP 403"),
        ("500", TOKEN, FlightsUnreachableError, "answered HTTP 500"),
        ("slow", TOKEN, FlightsUnreachableError, "did not answer within 0.5 s"),
        ("html", TOKEN, MalformedFlightError, "not valid JSON"),
        ("drip", TOKEN, FlightsUnreachableError, "did not send its answer within 1 s"),
        ("huge", TOKEN, MalformedFlightError, "larger than 8,388,608 bytes; not a flight"),
        ("list", TOKEN, MalformedFlightError, "not an object"),
        ("other", TOKEN, MalformedFlightError, "the answer is flight 00000000"),
    ],
)
def test_each_flights_api_failure_has_its_own_error(
    api: tuple[str, _Api],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    token: str | None,
    error: type[FlightError],
    match: str,
) -> None:
    url, state = api
    state.mode = mode
    monkeypatch.delenv("TAKEOFF_CACHE_FLIGHTS_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("TAKEOFF_CACHE_FLIGHTS_TOKEN", token)
    with pytest.raises(error, match=match) as info:
        fetch_flight(url, FLIGHT_ID, timeout_s=0.5, deadline_s=1.0)
    assert info.value.exit_code == EXIT_RESOLVE
    assert "\n" not in str(info.value)
    assert TOKEN not in str(info.value) and "wrong" not in str(info.value)


def test_an_unreachable_flights_api_and_a_bad_id(unused_port: int) -> None:
    with pytest.raises(FlightsUnreachableError, match="cannot reach"):
        fetch_flight(f"http://127.0.0.1:{unused_port}", FLIGHT_ID, token="t")
    with pytest.raises(InvalidRequestError, match="not a UUID"):
        fetch_flight(f"http://127.0.0.1:{unused_port}", "flight-7")


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there
