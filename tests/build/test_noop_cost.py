"""A no-op re-run loads none of what building needs, and waits on nothing it does not need.

Run as an operator runs it: ``takeoff-cache build`` in a fresh process, on a
request with a bbox and on one with an area (every cache ``prepare`` makes),
against a real Prefect server and with no Prefect API configured (answered
before Prefect starts). The timings themselves are ``benchmarks/noop.py``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from takeoff_cache.demo.synthetic import corridor_area
from tests.support.procs import PrefectServer, copy_sandbox, run_build, settle_corpus

# What engines, decoding and the index need; a no-op needs none of them, and no
# more what normalizes an area (shapely, pyproj) or plans a flight (prepare).
HEAVY = (
    "numpy",
    "onnx",
    "onnxruntime",
    "PIL",
    "simplejpeg",
    "faiss",
    "dask",
    "shapely",
    "pyproj",
    "takeoff_cache.tiles.area",
    "takeoff_cache.prepare",
)
# Answered before Prefect starts: not even Prefect or its HTTP client.
BEFORE_PREFECT = (*HEAVY, "prefect", "httpx")

RUN_AND_LIST = """
import sys
from takeoff_cache.cli.main import main
code = main(sys.argv[2:])
loaded = sorted(m for m in sys.argv[1].split(",") if m in sys.modules)
print("loaded:", " ".join(loaded) or "-", file=sys.stderr)
sys.exit(code)
"""


def with_area(root: Path) -> None:
    """Give the sandbox's request an area: a corridor across its bbox, as a GeoJSON file
    whose ring is not yet in the normalized form the build hashes."""
    request = root / "request.toml"
    feature = corridor_area(tuple(tomllib.loads(request.read_text())["bbox"]))
    (root / "area.geojson").write_text(json.dumps(feature))
    request.write_text(request.read_text() + 'area = "area.geojson"\n')


@pytest.fixture(scope="module", params=["bbox", "area"])
def built(
    request: pytest.FixtureRequest,
    prefect_server: PrefectServer,
    demo_source: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The demo built once through the server, with the request's bbox or an area."""
    root = copy_sandbox(demo_source, tmp_path_factory.mktemp("noop-cost") / request.param)
    if request.param == "area":
        with_area(root)
    settle_corpus(root)
    first = run_build(root, prefect_server.env())
    assert first.returncode == 0, first.stderr
    assert first.report()["outcome"] == "success"
    signed = json.loads((root / "cache" / "Manifest.json").read_text())["signed"]
    assert (signed["request"]["area"] is not None) == (request.param == "area")
    return root


def rerun(root: Path, env: dict[str, str], modules: tuple[str, ...]) -> str:
    """Re-run the build in a fresh process; what of ``modules`` it loaded."""
    argv = ["build", "--request", str(root / "request.toml"), "--work-dir", str(root / "work")]
    again = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST, ",".join(modules), *argv, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["outcome"] == "idempotent_no_op"
    return again.stderr.splitlines()[-1]


def test_a_no_op_re_run_loads_no_engine_runtime_decoder_or_index(
    prefect_server: PrefectServer, built: Path
) -> None:
    assert rerun(built, prefect_server.env(), HEAVY) == "loaded: -"


def test_a_no_op_answered_before_prefect_loads_neither_prefect_nor_area_code(
    built: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    assert rerun(built, env, BEFORE_PREFECT) == "loaded: -"


@pytest.mark.parametrize(
    ("server", "interval", "kept"),
    [(False, None, False), (True, None, False), (False, "60", False), (True, "60", True)],
)
def test_heartbeats_only_toward_a_server_and_when_their_interval_was_set(
    monkeypatch: pytest.MonkeyPatch, server: bool, interval: str | None, kept: bool
) -> None:
    from prefect.settings import get_current_settings, temporary_settings

    from takeoff_cache_prefect.run import HEARTBEAT_SETTINGS, heartbeats_only_when_asked

    for name in HEARTBEAT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    updates: dict[str, object] = {"api.url": "http://127.0.0.1:4200/api" if server else None}
    if interval is not None:
        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", interval)
        updates["flows.heartbeat_frequency"] = int(interval)
    with temporary_settings(updates=updates), heartbeats_only_when_asked():
        value = get_current_settings().flows.heartbeat_frequency
    assert value == (int(interval) if kept and interval else None)
