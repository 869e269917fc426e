"""The fault points themselves: kill, stop and fail exactly where and when asked."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff_cache.core import env, faults

SCRIPT = """
from takeoff_cache.core.faults import checkpoint
for i in range(3):
    checkpoint("a")
    print("passed a", i + 1, flush=True)
checkpoint("b")
print("passed b", flush=True)
"""


def run(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAKEOFF_CACHE_")}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def armed(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    yield monkeypatch
    for name in (env.KILL_AT, env.FAIL_AT, env.STOP_AT, env.FAULT_TRACE):
        monkeypatch.delenv(name, raising=False)
    faults.reset()


def test_without_a_plan_every_point_passes() -> None:
    proc = run()
    assert proc.returncode == 0
    assert proc.stdout.split("\n")[:4] == ["passed a 1", "passed a 2", "passed a 3", "passed b"]


def test_kill_at_a_point_sends_sigkill_there() -> None:
    proc = run(TAKEOFF_CACHE_KILL_AT="b")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.splitlines() == ["passed a 1", "passed a 2", "passed a 3"]


def test_kill_at_the_nth_occurrence() -> None:
    proc = run(TAKEOFF_CACHE_KILL_AT="a:2")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.splitlines() == ["passed a 1"]


def test_stop_at_a_point_waits_for_sigcont() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAKEOFF_CACHE_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        env={**clean, "TAKEOFF_CACHE_STOP_AT": "a:3"},
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    stat = Path(f"/proc/{proc.pid}/stat")
    while stat.read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.splitlines()[-1] == "passed b"


def test_fail_at_raises_the_named_errno_with_the_path(armed: pytest.MonkeyPatch) -> None:
    armed.setenv(env.FAIL_AT, "x.rename:2:ENOSPC")
    faults.reset()
    faults.checkpoint("x.rename", "/cache/a")
    with pytest.raises(OSError) as caught:
        faults.checkpoint("x.rename", "/cache/b")
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == "/cache/b"
    faults.checkpoint("x.rename", "/cache/c")  # only the second time


def test_fail_at_every_occurrence_without_a_count(armed: pytest.MonkeyPatch) -> None:
    armed.setenv(env.FAIL_AT, "x.fsync:EIO")
    faults.reset()
    for _ in range(3):
        with pytest.raises(OSError, match="Input/output error"):
            faults.checkpoint("x.fsync")


def test_trace_records_every_point_in_order(armed: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    armed.setenv(env.FAULT_TRACE, str(trace))
    faults.reset()
    for name in ("one", "two", "one"):
        faults.checkpoint(name)
    assert [line.split()[0] for line in trace.read_text().splitlines()] == ["one", "two", "one"]


@pytest.mark.parametrize(
    ("kill", "fail"),
    [("a:0", None), ("a:x", None), (None, "a:EIO:2"), (None, "a"), (None, "a:NOTERRNO")],
)
def test_malformed_specs_are_refused(kill: str | None, fail: str | None) -> None:
    with pytest.raises(ValueError, match="fault spec"):
        faults.parse(kill, fail)
