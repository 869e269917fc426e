"""A no-op re-run loads none of what building needs, and waits on nothing it does not need.

Run as an operator runs it: ``takeoff-cache build`` in a fresh process against
a real Prefect server. The timings themselves are ``benchmarks/noop.py``'s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import PrefectServer, copy_sandbox, run_build

# What engines, decoding and the index need; a no-op needs none of them.
HEAVY = ("numpy", "onnx", "onnxruntime", "PIL", "simplejpeg", "faiss", "dask")

RUN_AND_LIST = f"""
import sys
from takeoff_cache.cli.main import main
code = main(sys.argv[1:])
loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
print("loaded:", " ".join(loaded) or "-", file=sys.stderr)
sys.exit(code)
"""


def test_a_no_op_re_run_loads_no_engine_runtime_decoder_or_index(
    prefect_server: PrefectServer, demo_source: Path, tmp_path: Path
) -> None:
    root = copy_sandbox(demo_source, tmp_path / "sandbox")
    env = prefect_server.env()
    first = run_build(root, env)
    assert first.returncode == 0, first.stderr
    assert first.report()["outcome"] == "success"
    argv = ["build", "--request", str(root / "request.toml"), "--work-dir", str(root / "work")]
    again = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST, *argv, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert '"outcome": "idempotent_no_op"' in again.stdout
    assert again.stderr.splitlines()[-1] == "loaded: -"


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
