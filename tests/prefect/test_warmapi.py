"""The local Prefect API that stays up between commands, and stops itself once idle.

Each test gives it its own PREFECT_HOME, turns it on (the suite's default is off:
see conftest), and leaves no server behind: it checks that none is running when
it ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff_cache.core.env import PREFECT_IDLE_MIN, SECRETS, TILES_API_KEY
from takeoff_cache.errors import InvalidRequestError
from takeoff_cache_prefect.tempapi import (
    DEFAULT_IDLE_MIN,
    STATE_DIR,
    STATE_FILE,
    WarmServer,
    idle_minutes,
    stop_warm,
)
from tests.conftest import Demo

STARTUP_S = 180.0  # a first start migrates a new database; on a busy host it is slow


def _servers_of(home: Path) -> list[int]:
    """Every process running a warm server of ``home``."""
    folder = str(home / STATE_DIR).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if folder in args:
            found.append(int(entry.name))
    return found


def _wait_none(home: Path, limit_s: float = 60) -> list[int]:
    deadline = time.monotonic() + limit_s
    while (left := _servers_of(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A PREFECT_HOME of its own; no warm server of it survives the test."""
    path = tmp_path / "prefect-home"
    path.mkdir()
    try:
        yield path
    finally:
        stop_warm(path)
        for pid in _wait_none(path, 30):
            os.kill(pid, 9)
        assert not _servers_of(path)


def _env(home: Path, idle_min: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", PREFECT_IDLE_MIN: idle_min})
    env[TILES_API_KEY] = "tk-a-secret-the-server-must-not-keep"
    return env


def _state(home: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((home / STATE_DIR / STATE_FILE).read_text())
    return data


def test_the_idle_time_is_minutes_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PREFECT_IDLE_MIN, raising=False)
    assert idle_minutes() == DEFAULT_IDLE_MIN
    for text, minutes in (("5", 5.0), ("0.5", 0.5), ("0", 0.0), ("off", 0.0), (" OFF ", 0.0)):
        monkeypatch.setenv(PREFECT_IDLE_MIN, text)
        assert idle_minutes() == minutes
    for text in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(PREFECT_IDLE_MIN, text)
        with pytest.raises(InvalidRequestError, match=PREFECT_IDLE_MIN):
            idle_minutes()


STARTER = """
import sys
from pathlib import Path
from takeoff_cache_prefect.tempapi import WarmServer
server = WarmServer(Path(sys.argv[1]), float(sys.argv[2]))
print(server.pid, server.started, server.wait_healthy(float(sys.argv[3])), flush=True)
"""


def test_two_commands_starting_at_once_share_one_that_stops_once_idle(home: Path) -> None:
    idle_s = 3.0
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(home), str(idle_s), str(STARTUP_S)],
            env=_env(home, "1"),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    answers = [p.communicate(timeout=STARTUP_S + 30)[0].split() for p in starters]
    assert all(p.returncode == 0 for p in starters), answers
    assert {a[0] for a in answers} == {str(_state(home)["pid"])}  # one server for both
    assert sorted(a[1] for a in answers) == ["False", "True"]  # one started it
    assert all(a[2] == "True" for a in answers)
    pid = int(str(_state(home)["pid"]))
    assert os.getsid(pid) == pid  # detached: no signal to a command's group reaches it
    # It outlives the command that started it: none of that command's secrets do.
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.split(b"=")[0].decode() in SECRETS]
    # Both starters have ended: unused, it stops itself after idle_s and says so.
    assert not _wait_none(home, 60)
    assert not (home / STATE_DIR / STATE_FILE).exists()


def test_a_server_in_use_is_not_idle(home: Path) -> None:
    server = WarmServer(home, 1.0)
    try:
        assert server.wait_healthy(STARTUP_S)
        time.sleep(4)  # past its idle time, but this process still uses it
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as answer:
            assert answer.status == 200
    finally:
        server.stop()  # leaves it, unused now
    assert not _wait_none(home, 60)


def _flow_runs(url: str) -> list[dict[str, object]]:
    request = urllib.request.Request(
        f"{url}/flow_runs/filter",
        data=b'{"limit": 50}',
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        runs: list[dict[str, object]] = json.load(answer)
    return runs


def test_a_second_build_reuses_the_warm_api_whose_ui_shows_both_runs(
    demo: Demo, home: Path
) -> None:
    env = _env(home, "10")
    cli = [sys.executable, "-m", "takeoff_cache.cli.main"]
    first = subprocess.run(
        [*cli, *demo.build_args("--json", "-v")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    state = _state(home)
    pid, url = int(str(state["pid"])), str(state["url"])
    assert _servers_of(home) == [pid]  # up after the command that started it ended
    # A new takeoff origin: a build with nothing to embed, through the same API.
    origin = "--takeoff-origin=48.4550,35.0470,120"
    second = subprocess.run(
        [*cli, *demo.build_args("--json", "-v", origin)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["outcome"] == "success"
    assert _state(home)["pid"] == pid and _servers_of(home) == [pid]
    # Its "View at" link is to this server's UI, which answers.
    links = [line.split("View at ")[1] for line in second.stderr.splitlines() if "View at" in line]
    assert links and all(link.startswith(url.removesuffix("/api")) for link in links)
    # As a browser asks for it (the UI answers page loads, not other requests, there).
    page_request = urllib.request.Request(links[0], headers={"Accept": "text/html"})
    with urllib.request.urlopen(page_request, timeout=10) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    assert sum(run["state_type"] == "COMPLETED" for run in _flow_runs(url)) >= 2
    assert stop_warm(home)
    assert not _wait_none(home)


def test_a_temporary_api_prints_no_link_to_itself(demo: Demo, home: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "takeoff_cache.cli.main", *demo.build_args("--json", "-v")],
        env=_env(home, "0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "temporary Prefect API on" in proc.stderr
    assert "View at" not in proc.stderr
    assert not (home / STATE_DIR).exists() and not _servers_of(home)


def test_a_server_whose_folder_is_removed_stops(home: Path) -> None:
    import shutil

    server = WarmServer(home, 600.0)  # far from idle
    try:
        assert server.wait_healthy(STARTUP_S)
    finally:
        server.stop()
    assert _servers_of(home) == [server.pid]
    shutil.rmtree(home / STATE_DIR)  # as a test's temporary PREFECT_HOME goes
    assert not _wait_none(home, 60)
