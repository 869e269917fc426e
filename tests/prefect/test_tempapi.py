"""The temporary Prefect API that the CLI starts before importing Prefect."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from takeoff_cache_prefect.tempapi import EarlyServer, _profile_names_api, serving, start_early
from tests.conftest import Demo

# What a build run as an operator runs it reports about Prefect's own temporary server:
# its module is imported only to start one.
RUN_AND_TELL = """
import sys
from takeoff_cache.cli.main import main
code = main(sys.argv[1:])
print("prefect server module:", "prefect.server.api.server" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def test_none_where_prefect_is_loaded_or_the_environment_names_an_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import prefect  # noqa: F401  (loaded by now in any case: this module's imports)

    assert start_early() is None
    monkeypatch.delitem(sys.modules, "prefect", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert start_early() is None


@pytest.mark.parametrize(
    "name", ["PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"]
)
def test_none_where_temporary_apis_are_turned_off(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delitem(sys.modules, "prefect", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(name, "false")
    assert start_early() is None


def test_the_active_profile_says_whether_an_api_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles.toml"
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    assert not _profile_names_api()  # no profiles file: Prefect's defaults
    profiles.write_text(
        'active = "remote"\n'
        '[profiles.remote]\nPREFECT_API_URL = "http://10.0.0.2:4200/api"\n'
        '[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
    )
    assert _profile_names_api()
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert not _profile_names_api()
    profiles.write_text("active = [")  # unreadable: leave the server to Prefect
    assert _profile_names_api()


@pytest.mark.usefixtures("prefect_harness")
def test_an_early_server_is_stopped_unused_where_the_settings_name_an_api() -> None:
    from prefect.settings import get_current_settings

    server = EarlyServer()
    process = server.process
    assert process is not None
    # The harness names its API in Prefect's settings, not in the environment.
    with serving(server):
        assert get_current_settings().api.url not in (None, server.url)
    assert server.process is None
    assert process.poll() is not None


def test_a_build_without_an_api_uses_the_early_server_and_stops_it(demo: Demo) -> None:
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", RUN_AND_TELL, *demo.build_args("--json", "--verbose")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "success"
    lines = proc.stderr.splitlines()
    assert lines[-1] == "prefect server module: False"  # Prefect started no server of its own
    url = next(line.split()[-1] for line in lines if "temporary Prefect API on" in line)
    port = int(url.split(":")[2].split("/")[0])
    # Stopped when the build's process ended.
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    # It records task runs in batches, and wrote its last batch as it stopped:
    # every phase of the build is a completed task run in Prefect's database.
    with sqlite3.connect(Path(os.environ["PREFECT_HOME"]) / "prefect.db") as db:
        runs = db.execute(
            "SELECT id FROM flow_run WHERE parameters LIKE ? ORDER BY start_time DESC",
            (f"%{json.dumps(str(demo.cache))[1:-1]}%",),
        ).fetchall()
        tasks = db.execute(
            "SELECT name, state_type FROM task_run WHERE flow_run_id = ?", (runs[0][0],)
        ).fetchall()
    phases = {"validate", "lock", "select", "engines", "descriptors", "manifest", "commit"}
    assert phases <= {name for name, _ in tasks}
    assert {state for _, state in tasks} == {"COMPLETED"}


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its new parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_build_leaves_no_server_behind(demo: Demo) -> None:
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    build = subprocess.Popen(
        [sys.executable, "-m", "takeoff_cache.cli.main", *demo.build_args("--json", "--verbose")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert build.stderr is not None
        for line in build.stderr:
            if "temporary Prefect API on" in line:
                break
        children = [
            int(pid)
            for task in Path(f"/proc/{build.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        servers = [
            pid for pid in children if b"create_app" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(servers) == 1, children
    finally:
        build.send_signal(signal.SIGKILL)  # no atexit hook runs
        build.wait()
    deadline = time.monotonic() + 60
    while not _gone(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(servers[0])
