"""`prepare` answers bad input before its first request and before Prefect starts,
every problem at once; and a re-run with nothing to do is answered the same way.

Run as an operator runs it: ``takeoff-cache prepare`` in a fresh process, with no
Prefect API configured, against a real tile server on 127.0.0.1. The wall times
are ``benchmarks/noop.py``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff_cache.build.request import read_request_file
from takeoff_cache.core.env import TILES_API_KEY
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache.prepare.precheck import precheck
from tests.conftest import Demo
from tests.support.cli import run_cli
from tests.support.tileserver import TileServer, tile_server

FLIGHTS = Path(__file__).parents[1] / "data" / "flights"
PLAN = FLIGHTS / "survey_corridor.plan"
ARGS = ("--zoom", "16", "--buffer-m", "100", "--min-recall", "0", "--allow-gaps")

# Runs the command line and lists which of the named modules it loaded.
RUN_AND_LIST = """
import sys
from takeoff_cache.cli.main import main
code = main(sys.argv[2:])
loaded = sorted(m for m in sys.argv[1].split(",") if m in sys.modules)
print("loaded:", " ".join(loaded) or "-", file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture
def server() -> Iterator[TileServer]:
    with tile_server() as state:
        yield state


def prepare_toml(demo: Demo, drop: tuple[str, ...] = ()) -> Path:
    """The demo's request without what the flight decides, and without ``drop``."""
    decided = ("corpus", "bbox", "zoom_levels", "takeoff_origin", "flight_id", *drop)
    text = "\n".join(
        line for line in demo.request.read_text().splitlines() if not line.startswith(decided)
    )
    path = demo.root / "prepare.toml"
    path.write_text(text + "\n")
    return path


def no_api_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", TILES_API_KEY)}
    return env


def run_prepare(
    demo: Demo, request: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    args = ["prepare", "--request", str(request), "--work-dir", str(demo.work), *ARGS, *extra]
    return subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST, "prefect,httpx.Client", *args],
        env=env or no_api_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("takeoff-cache: error:")]


def test_three_mistakes_are_three_lines_before_any_request(demo: Demo, server: TileServer) -> None:
    request = prepare_toml(demo, drop=("sector_class", "key"))
    result = run_prepare(
        demo,
        request,
        "--plan", str(PLAN),
        "--tiles-url", server.template,
        "--tiles-key-header", "X-Api-Key",
        "--backbones", str(demo.root / "no-such-backbones.toml"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 4, result.stderr
    joined = "\n".join(errors)
    assert "sector_class: must be one of" in joined
    assert "key: missing (give --key)" in joined
    assert "no-such-backbones.toml does not exist" in joined
    assert f"tiles key: {TILES_API_KEY} is not set" in joined
    assert "Traceback" not in result.stderr
    assert "loaded: -" in result.stderr  # neither Prefect nor an HTTP client
    assert server.tile_requests() == []
    assert not demo.work.exists()  # nothing written, not even the work folder


def test_where_the_flight_comes_from_is_checked_with_the_rest(demo: Demo) -> None:
    request = prepare_toml(demo, drop=("trust",))
    result = run_prepare(demo, request, "--flights-api", "ftp://flights.example")
    assert result.returncode == 2
    errors = "\n".join(error_lines(result.stderr))
    assert "trust: missing (give --trust)" in errors
    assert "give --plan FILE, or --flight-id UUID and --flights-api URL" in errors


def test_a_companion_build_leaves_the_companion_paths_to_the_companion(demo: Demo) -> None:
    # Its cache root and key are the companion's (--companion-*): nothing here checks
    # them. What is sent (the backbones) and the workstation's trust store, which the
    # companion's manifest is checked with, are this machine's.
    raw = read_request_file(prepare_toml(demo, drop=("key", "cache_root")))
    plan = {"plan": str(PLAN)}
    precheck(raw, plan, companion=True, pool=False, backend="auto", work_dir=None)
    missing = {**raw, "backbones": str(demo.root / "gone.toml"), "trust": None}
    with pytest.raises(InvalidRequestError) as caught:
        precheck(missing, plan, companion=True, pool=False, backend="auto", work_dir=None)
    trust, backbones = str(caught.value).splitlines()
    assert trust == "trust: missing (give --trust)"
    assert backbones.startswith("backbones: ") and backbones.endswith("gone.toml does not exist")
    # Built here, the same request misses its own key and cache root.
    with pytest.raises(InvalidRequestError, match="key: missing"):
        precheck(raw, plan, companion=False, pool=False, backend="auto", work_dir=None)
    # Through a work pool the paths are the worker's: only the fields are checked.
    elsewhere = {**raw, "key": "/on/the/worker/key.pem", "cache_root": "/on/the/worker"}
    precheck(elsewhere, plan, companion=False, pool=True, backend="auto", work_dir=None)


@pytest.mark.usefixtures("prefect_harness")
def test_a_rerun_with_nothing_to_do_is_answered_before_prefect_starts(
    capsys: pytest.CaptureFixture[str], demo: Demo, server: TileServer
) -> None:
    request = prepare_toml(demo)
    first = run_cli(
        capsys, "prepare", "--request", str(request), "--work-dir", str(demo.work), "--json",
        *ARGS, "--plan", str(PLAN), "--tiles-url", server.template,
    )  # fmt: skip
    assert first.code == 0, first.err
    manifest = (demo.cache / "Manifest.json").read_bytes()
    requests = len(server.tile_requests())

    again = run_prepare(demo, request, "--plan", str(PLAN), "--tiles-url", server.template)
    assert again.returncode == 0, again.stderr
    assert "loaded: -" in again.stderr  # no Prefect, no HTTP client: nothing to fetch
    assert "outcome:               idempotent_no_op" in again.stdout
    assert "verify:   ok (manifest version 1)" in again.stdout
    assert len(server.tile_requests()) == requests
    assert (demo.cache / "Manifest.json").read_bytes() == manifest

    as_json = run_prepare(
        demo, request, "--plan", str(PLAN), "--tiles-url", server.template, "--json"
    )
    report = json.loads(as_json.stdout)
    assert report["outcome"] == "idempotent_no_op"
    assert report["build"]["outcome"] == "idempotent_no_op"
    assert report["verify"]["ok"] is True
    assert report["download"]["fetched"] == 0
    assert report["ready"]["ok"] is True

    # Stricter thresholds judge the same cache again, as the flow judges a no-op:
    # not ready is exit 12, and the cache in force stays as it is.
    stricter = run_prepare(
        demo, request, "--plan", str(PLAN), "--tiles-url", server.template, "--min-recall", "1"
    )
    assert stricter.returncode == 12, stricter.stderr
    assert "loaded: -" in stricter.stderr
    assert "takeoff-cache: not ready: localization: route Recall@1" in stricter.stderr
    assert (demo.cache / "Manifest.json").read_bytes() == manifest


@pytest.mark.usefixtures("prefect_harness")
def test_a_deployment_run_missing_a_secret_fails_in_one_line(
    demo: Demo,
    server: TileServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As a worker runs prepare-flight: parameters only, the key's variable unset."""
    from takeoff_cache_prefect.flows.prepare import prepare_flight

    from takeoff_cache.build.request import read_request_file

    monkeypatch.delenv(TILES_API_KEY, raising=False)
    raw = read_request_file(prepare_toml(demo))
    state = prepare_flight(
        plan=str(PLAN),
        tiles_url=server.template,
        tiles_key_header="X-Api-Key",
        zoom_levels=[16],
        work_dir=str(demo.work),
        **{k: raw[k] for k in ("sector_class", "backbones", "cache_root", "key", "trust")},
        return_state=True,
    )
    assert state.is_failed()
    assert (
        state.message
        == f"resolve: tiles key: {TILES_API_KEY} is not set (the source sends it as X-Api-Key)"
    )
    logged = [r for r in caplog.records if TILES_API_KEY in r.getMessage()]
    assert logged and all(r.exc_info is None for r in logged)
    assert "Traceback" not in caplog.text
    assert server.tile_requests() == []
