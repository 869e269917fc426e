"""What the command line answers before Prefect starts, and how a signal ends a build.

Each case runs ``takeoff-cache`` as a fresh process with its own empty
``PREFECT_HOME`` and no API URL, as an operator's shell would: a Prefect that
started (the temporary API, a flow run) leaves its database there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from takeoff_cache.core.layout import STAGING_NAME
from takeoff_cache.trust.keys import load_trust_store
from takeoff_cache.trust.verify import verify_cache
from tests.cli.test_errors import built
from tests.conftest import Demo
from tests.support.procs import lock_is_free

__all__ = ["built"]  # the fixture: a demo cache built once, by the command line

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home.mkdir(exist_ok=True)
    return {**env, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", **extra}


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "takeoff_cache.cli.main", *argv]


def test_a_noop_rerun_is_answered_without_starting_prefect(built: Demo, tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    manifest = built.cache / "Manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    proc = subprocess.run(
        _cli(*built.build_args("--json")), env=_env(home), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["outcome"] == "idempotent_no_op"
    assert report["engines_built"] == 0 and report["descriptors_generated"] == 0
    assert set(report["phases"]) == {"validate", "lock", "select", "identity", "noop"}
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    assert list(home.iterdir()) == [], "Prefect was started for a no-op"


def test_a_changed_request_still_runs_the_flow(built: Demo, tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    proc = subprocess.run(
        _cli(*built.build_args("--json", "--sector", "active_conflict")),
        env=_env(home),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["outcome"] == "success"
    assert "engines" in report["phases"] and "commit" in report["phases"]
    assert any(home.iterdir()), "the build ran without Prefect"


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--zoom", "abc", "zoom_levels"),
        ("--bbox", "1,2,3", "bbox"),
        ("--coverage", "loose", "coverage"),
        ("--expires-in", "forever", "expires-in"),
    ],
)
def test_bad_input_is_refused_before_prefect_starts(
    built: Demo, tmp_path: Path, flag: str, value: str, words: str
) -> None:
    home = tmp_path / "prefect-home"
    proc = subprocess.run(
        _cli(*built.build_args(f"{flag}={value}")), env=_env(home), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert list(home.iterdir()) == []


def _stopped(proc: subprocess.Popen[str]) -> bool:
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state == "T"


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_signal_mid_build_ends_it_with_one_line_and_the_cache_as_it_was(
    built: Demo, tmp_path: Path, sig: signal.Signals, code: int, word: str
) -> None:
    trusted = load_trust_store(built.trust)
    before = verify_cache(built.cache, trusted)
    manifest_bytes = (built.cache / "Manifest.json").read_bytes()
    # A changed request and a fresh work folder: engines and descriptors to compute.
    argv = _cli(
        "build",
        "--request",
        str(built.request),
        "--work-dir",
        str(tmp_path / "fresh-work"),
        "--sector",
        "active_conflict",
    )
    env = _env(tmp_path / "prefect-home", TAKEOFF_CACHE_STOP_AT="descriptors.batch_stored:1")
    # A suite started in the background (`make test &`) has SIGINT ignored, and a
    # build would inherit that: start it as a terminal's foreground command is.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 240
    while not _stopped(proc):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never reached its descriptors"
        time.sleep(0.1)
    assert (built.cache / STAGING_NAME).is_dir()
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], lines
    assert (built.cache / "Manifest.json").read_bytes() == manifest_bytes
    assert verify_cache(built.cache, trusted).version == before.version
    assert not (built.cache / STAGING_NAME).exists()
    assert lock_is_free(built.cache)
