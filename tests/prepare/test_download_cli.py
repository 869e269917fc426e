"""``takeoff-cache prepare`` as an operator runs it, against real tile servers on
127.0.0.1: a template that 404s everywhere and a refused key end with exit 10 and
one line naming the cause, before any build; SIGTERM to a real ``prepare``
process held by a server that drips its headers ends it with 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from takeoff_cache.core.env import PREFECT_IDLE_MIN, TILES_API_KEY
from tests.conftest import Demo
from tests.support.cli import CliResult, run_cli
from tests.support.tileserver import tile_server

pytestmark = pytest.mark.usefixtures("prefect_harness")

PLAN = Path(__file__).parents[1] / "data" / "flights" / "survey_corridor.plan"
ARGS = ("--plan", str(PLAN), "--zoom", "16", "--buffer-m", "100")
KEY = "tk-4Rf8distinctive-tiles-key-0d2e"
STOP_BOUND_S = 15.0  # against a hang, not a timing


def request_file(demo: Demo) -> Path:
    """The demo's request without what prepare decides (corpus, bbox, zooms, origin)."""
    text = "\n".join(
        line
        for line in demo.request.read_text().splitlines()
        if not line.startswith(("corpus", "bbox", "zoom_levels", "takeoff_origin", "flight_id"))
    )
    path = demo.root / "prepare.toml"
    path.write_text(text + "\n")
    return path


def errors(result: CliResult) -> list[str]:
    """What the command said on stderr besides its progress lines."""
    return [line for line in result.err_lines if not line.startswith("tiles ")]


def prepare(capsys: pytest.CaptureFixture[str], demo: Demo, *extra: str) -> CliResult:
    argv = ["prepare", "--request", str(request_file(demo)), "--work-dir", str(demo.work)]
    return run_cli(capsys, *argv, *ARGS, *extra)


def test_a_template_that_404s_everywhere_is_exit_10_naming_the_template(
    capsys: pytest.CaptureFixture[str], demo: Demo
) -> None:
    with tile_server(faults={"*": ["404"]}) as server:
        png = server.template.replace(".jpg", ".png")
        result = prepare(capsys, demo, "--tiles-url", png)
        asked = len(server.tile_requests())
    assert result.code == 10, result.err
    assert len(errors(result)) == 1, result.err
    line = errors(result)[0]
    assert "URL template probably does not match the server" in line and ".png" in line
    assert "download tiles for this area first" not in result.err + result.out
    assert "Traceback" not in result.err
    assert asked <= 12 + 2 * 4  # the breaker, not the whole area
    assert not (demo.cache / "Manifest.json").exists()  # no build from an empty corpus


def test_a_refused_key_is_exit_10_naming_the_variable(
    capsys: pytest.CaptureFixture[str], demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TILES_API_KEY, KEY)
    with tile_server(faults={"*": ["403"]}) as server:
        result = prepare(
            capsys, demo, "--tiles-url", server.template, "--tiles-key-header", "X-Api-Key"
        )
    assert result.code == 10, result.err
    assert len(errors(result)) == 1, result.err
    assert f"check {TILES_API_KEY} (sent as X-Api-Key)" in errors(result)[0]
    assert "later" not in errors(result)[0]
    assert KEY not in result.err + result.out


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_max_age_that_is_no_number_of_days_is_exit_2(
    capsys: pytest.CaptureFixture[str], demo: Demo, value: str
) -> None:
    with tile_server() as server:
        result = prepare(capsys, demo, "--tiles-url", server.template, f"--max-age={value}")
        assert server.tile_requests() == []
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and "--max-age must be a finite number" in result.err


def test_sigterm_ends_a_prepare_whose_tile_server_drips_its_headers(
    demo: Demo, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TAKEOFF_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), DO_NOT_TRACK="1")
    env[PREFECT_IDLE_MIN] = "0"  # a temporary API per command: nothing outlives the test
    (tmp_path / "prefect-home").mkdir()
    argv = ["prepare", "--request", str(request_file(demo)), "--work-dir", str(tmp_path / "w")]
    with tile_server(faults={"*": ["headerdrip"]}, drip_s=0.5) as server:
        argv += [*ARGS, "--tiles-url", server.template]
        proc = subprocess.Popen(
            [sys.executable, "-m", "takeoff_cache.cli.main", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            limit = time.monotonic() + 240
            while server.in_flight < 4:  # every worker is held in its headers
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < limit, "no tile request"
                time.sleep(0.05)
            time.sleep(1.0)  # well inside the reads: 1 byte per 0.5 s, 30 s deadline
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            _, err = proc.communicate(timeout=STOP_BOUND_S * 4)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("tiles ")]
    assert proc.returncode == 143, err
    assert len(lines) == 1 and "terminated" in lines[0], err
    assert took < STOP_BOUND_S, took
