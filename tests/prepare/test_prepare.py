"""`takeoff-cache prepare` end to end: a real tile server, a real flights API, real builds."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from takeoff_cache.core.tilemath import tile_range
from takeoff_cache.prepare.area import flight_area
from takeoff_cache.prepare.sources import load_flight
from takeoff_cache.tiles.area import tiles_for_area
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.procs import CLI, hold_lock
from tests.support.tileserver import TileServer, tile_server

pytestmark = pytest.mark.usefixtures("prefect_harness")

FLIGHTS = Path(__file__).parents[1] / "data" / "flights"
PLAN = FLIGHTS / "survey_corridor.plan"
TILES_KEY = "tk-7Qz9distinctive-tiles-key-41c8"
TOKEN = "ft-Xw3distinctive-flights-token-9e2b"
# Small enough to build in seconds: one zoom, a 100 m buffer. The tile server repeats
# six images, which no backbone tells apart, so Recall@1 is not judged here
# (tests/prepare/test_readiness.py judges it on the demo's own tiles).
ARGS = ("--zoom", "16", "--buffer-m", "100", "--min-recall", "0")


@pytest.fixture
def server() -> Iterator[TileServer]:
    with tile_server() as state:
        yield state


@pytest.fixture
def request_file(demo: Demo, tmp_path: Path) -> Path:
    """The demo's request without corpus, bbox or zoom: prepare decides those."""
    text = "\n".join(
        line
        for line in demo.request.read_text().splitlines()
        if not line.startswith(("corpus", "bbox", "zoom_levels", "takeoff_origin", "flight_id"))
    )
    path = demo.root / "prepare.toml"
    path.write_text(text + "\n")
    return path


def prepare(
    capsys: pytest.CaptureFixture[str], demo: Demo, request_file: Path, *extra: str
) -> CliResult:
    return run_cli(
        capsys,
        "prepare",
        "--request",
        str(request_file),
        "--work-dir",
        str(demo.work),
        "--json",
        *ARGS,
        *extra,
    )


def corridor_tiles(plan: Path = PLAN) -> set[str]:
    area = flight_area(load_flight(plan), 100.0)
    return {f"{z}/{x}/{y}" for z, x, y in tiles_for_area(area.geojson, [16])}


def test_a_plan_becomes_a_verified_cache_of_its_corridor(
    capsys: pytest.CaptureFixture[str], demo: Demo, request_file: Path, server: TileServer
) -> None:
    result = prepare(
        capsys, demo, request_file, "--plan", str(PLAN), "--tiles-url", server.template
    )
    assert result.code == 0, result.err
    report = result.json()
    wanted = corridor_tiles()
    assert report["outcome"] == "success" and report["verify"]["ok"]
    assert report["area"]["tiles"] == len(wanted) == report["build"]["tiles"]
    assert report["area"]["tiles_per_zoom"] == {"16": len(wanted)}
    assert report["download"]["fetched"] == len(wanted)
    assert set(server.served_zxy()) == wanted
    # The corridor, not its bounding box.
    x0, x1, y0, y1 = tile_range(tuple(report["area"]["bbox"]), 16)
    assert len(wanted) < (x1 - x0 + 1) * (y1 - y0 + 1)
    # One MBTiles in the work folder whatever the server, found again offline.
    corpus = Path(report["corpus"])
    assert corpus == demo.work / "tiles" / "tiles.mbtiles"
    signed = json.loads((demo.cache / "Manifest.json").read_text())["signed"]
    assert signed["corpus"]["tile_count"] == len(wanted)
    area_file = json.loads(Path(report["area"]["path"]).read_text())
    assert signed["request"]["area"] == area_file["geometry"]
    home = load_flight(PLAN).takeoff_origin
    assert signed["request"]["takeoff_origin"] == list(home)

    requests = len(server.tile_requests())
    again = prepare(capsys, demo, request_file, "--plan", str(PLAN), "--tiles-url", server.template)
    assert again.code == 0, again.err
    assert again.json()["build"]["outcome"] == "idempotent_no_op"
    assert again.json()["download"]["fetched"] == 0
    assert len(server.tile_requests()) == requests


def test_a_dry_run_fetches_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], demo: Demo, request_file: Path, server: TileServer
) -> None:
    before = sorted(p.name for p in demo.cache.iterdir())
    result = prepare(
        capsys, demo, request_file, "--plan", str(PLAN), "--tiles-url", server.template, "--dry-run"
    )
    assert result.code == 0, result.err
    download = result.json()["download"]
    assert download["dry_run"] and download["to_fetch"] == len(corridor_tiles())
    assert download["per_zoom"] == {"16": len(corridor_tiles())}
    assert server.tile_requests() == []
    assert not (demo.work / "tiles").exists() and not (demo.work / "locks").exists()
    assert sorted(p.name for p in demo.cache.iterdir()) == before


def test_more_tiles_than_max_tiles_are_refused_up_front(
    capsys: pytest.CaptureFixture[str], demo: Demo, request_file: Path, server: TileServer
) -> None:
    result = prepare(
        capsys, demo, request_file, "--plan", str(PLAN), "--tiles-url", server.template,
        "--max-tiles", "10",
    )  # fmt: skip
    assert result.code == 10
    assert f"{len(corridor_tiles())} tiles to fetch" in result.err
    assert server.tile_requests() == []
    assert not (demo.work / "tiles").exists() and not (demo.work / "locks").exists()


@pytest.mark.parametrize("content", [b"not a plan", b'{"fileType": "Plan", "mission": {}}'])
def test_a_bad_plan_exits_9_before_any_write(
    capsys: pytest.CaptureFixture[str],
    demo: Demo,
    request_file: Path,
    server: TileServer,
    tmp_path: Path,
    content: bytes,
) -> None:
    plan = tmp_path / "bad.plan"
    plan.write_bytes(content)
    before = sorted(p.name for p in demo.cache.iterdir())
    result = prepare(
        capsys, demo, request_file, "--plan", str(plan), "--tiles-url", server.template
    )
    assert result.code == 9, result.err
    assert len(result.err_lines) == 1 and "flight" in result.err
    assert result.json()["phase"] == "resolve"
    assert not demo.work.exists()
    assert server.tile_requests() == []
    assert sorted(p.name for p in demo.cache.iterdir()) == before


def test_without_a_tiles_url_prepare_reports_the_missing_tiles(
    capsys: pytest.CaptureFixture[str], demo: Demo, request_file: Path
) -> None:
    result = prepare(capsys, demo, request_file, "--plan", str(PLAN), "--corpus", str(demo.corpus))
    # Most of the corridor is missing: built, reported, and not ready (exit 12).
    assert result.code == 12, result.err
    download = result.json()["download"]
    assert download["source"] is None
    assert 0 < download["missing"] < len(corridor_tiles())
    ready = result.json()["ready"]
    assert not ready["ok"]
    assert ready["coverage"]["needed"] - ready["coverage"]["present"] == download["missing"]


@pytest.fixture
def flights_api() -> Iterator[tuple[str, list[dict[str, str]]]]:
    body = (FLIGHTS / "flight.json").read_bytes()
    flight_id = json.loads(body)["id"]
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            ok = self.path == f"/flights/{flight_id}"
            authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            status, data = (200, body) if ok and authorized else (401 if ok else 404, b"{}")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_secrets_never_appear_in_any_output(
    capfd: pytest.CaptureFixture[str],
    demo: Demo,
    request_file: Path,
    server: TileServer,
    flights_api: tuple[str, list[dict[str, str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, seen = flights_api
    monkeypatch.setenv("TAKEOFF_CACHE_TILES_API_KEY", TILES_KEY)
    monkeypatch.setenv("TAKEOFF_CACHE_FLIGHTS_TOKEN", TOKEN)
    flight_id = json.loads((FLIGHTS / "flight.json").read_text())["id"]
    common: tuple[Any, ...] = (
        "--flight-id", flight_id, "--flights-api", url,
        "--tiles-url", server.template, "--tiles-key-param", "key", "-v",
    )  # fmt: skip
    result = prepare(capfd, demo, request_file, *common)
    assert result.code == 0, result.err
    assert seen and seen[0]["Authorization"] == f"Bearer {TOKEN}"
    assert all(r.query.get("key") == [TILES_KEY] for r in server.tile_requests())
    # A failing server too: its messages name URLs, which carry the key.
    server.faults["*"] = ["500"]
    monkeypatch.setenv("TAKEOFF_CACHE_FLIGHTS_TOKEN", TOKEN)
    failed = prepare(capfd, demo, request_file, *common, "--zoom", "17")
    assert failed.code == 10, failed.err
    for shown in (result, failed):
        for secret in (TILES_KEY, TOKEN):
            assert secret not in shown.out and secret not in shown.err
    for path in demo.work.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TILES_KEY.encode() not in data and TOKEN.encode() not in data, path


def _prefect_runs(flow_name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.START_TIME_DESC,
        )


def test_prepare_runs_as_a_flow_with_the_build_as_its_subflow(
    capsys: pytest.CaptureFixture[str], demo: Demo, request_file: Path, server: TileServer
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    result = prepare(
        capsys, demo, request_file, "--plan", str(PLAN), "--tiles-url", server.template
    )
    assert result.code == 0, result.err
    assert set(result.json()["phases"]) == {"resolve", "lock", "download", "build", "verify"}
    run = _prefect_runs("prepare-flight")[0]
    assert run.state is not None and run.state.is_completed()
    # The flight was resolved on this side: the run's parameters hold it, not a secret.
    assert run.parameters["flight"]["path"] and run.parameters["plan"] == str(PLAN)
    build = _prefect_runs("build-cache")[0]
    assert build.parent_task_run_id is not None
    with get_client(sync_client=True) as client:
        parent = client.read_task_run(build.parent_task_run_id)
        assert parent.flow_run_id == run.id
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    assert {"resolve", "lock", "download", "verify"} <= {t.name for t in tasks}


def test_a_second_prepare_of_the_same_corpus_is_refused_at_once(
    capsys: pytest.CaptureFixture[str],
    demo: Demo,
    request_file: Path,
    server: TileServer,
    tmp_path: Path,
) -> None:
    from takeoff_cache.prepare.job import workstation_lock

    corpus = tmp_path / "shared" / "tiles.mbtiles"
    held = workstation_lock(demo.work, corpus)
    holder = hold_lock(held.path)
    try:
        result = prepare(
            capsys, demo, request_file, "--plan", str(PLAN), "--tiles-url", server.template,
            "--corpus", str(corpus),
        )  # fmt: skip
        assert result.code == 4, result.err
        assert len(result.err_lines) == 1 and f"another prepare of {corpus}" in result.err
        assert result.json()["phase"] == "lock"
        assert server.tile_requests() == [] and not corpus.exists()
        # The lock is the corpus's: another corpus in the same work folder is free.
        with workstation_lock(demo.work, tmp_path / "other.mbtiles").acquire():
            pass
    finally:
        holder.kill()
        holder.wait()


PASSPHRASE = "pp-K2distinctive-key-passphrase-77d1"


def test_no_secret_reaches_the_prefect_database_or_any_file(
    demo: Demo,
    request_file: Path,
    server: TileServer,
    flights_api: tuple[str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    """A real ``prepare`` process on its own Prefect API: stdout, stderr (with run logs),
    the work folder, the cache and every file of PREFECT_HOME (the database included)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from takeoff_cache.trust.keys import write_keypair

    url, _ = flights_api
    pub = write_keypair(Ed25519PrivateKey.generate(), demo.root / "secret.key", PASSPHRASE.encode())
    (demo.trust / "secret.pub").write_bytes(pub.read_bytes())
    lines = [ln for ln in request_file.read_text().splitlines() if not ln.startswith("key")]
    request_file.write_text("\n".join([*lines, 'key = "secret.key"']) + "\n")
    home = tmp_path / "prefect-home"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k == "PREFECT_HOME"
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        TAKEOFF_CACHE_TILES_API_KEY=TILES_KEY,
        TAKEOFF_CACHE_FLIGHTS_TOKEN=TOKEN,
        TAKEOFF_CACHE_KEY_PASSPHRASE=PASSPHRASE,
    )
    flight_id = json.loads((FLIGHTS / "flight.json").read_text())["id"]
    argv = [
        *CLI,
        "prepare", "--request", str(request_file), "--work-dir", str(demo.work), *ARGS,
        "--flight-id", flight_id, "--flights-api", url,
        "--tiles-url", server.template, "--tiles-key-header", "X-Api-Key", "--json", "-v",
    ]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert json.loads(done.stdout)["verify"]["ok"]
    assert all(r.headers.get("X-Api-Key") == TILES_KEY for r in server.tile_requests())
    database = home / "prefect.db"
    with sqlite3.connect(database) as db:
        # The database scanned is the one that recorded this run, its tasks and its logs.
        (flows,) = db.execute("SELECT group_concat(name) FROM flow").fetchone()
        (task_runs,) = db.execute("SELECT count(*) FROM task_run").fetchone()
        (logs,) = db.execute("SELECT count(*) FROM log").fetchone()
    assert {"prepare-flight", "build-cache"} <= set(flows.split(",")) and task_runs and logs
    captured = {"stdout": done.stdout, "stderr": done.stderr}
    for folder in (home, demo.work, demo.cache):
        captured.update({str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    for secret in (TILES_KEY, TOKEN, PASSPHRASE):
        leaks = [name for name, data in captured.items() if secret.encode() in data]
        assert leaks == [], (secret, leaks)
