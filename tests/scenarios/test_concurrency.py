"""Four builds on one cache at the same instant: one runs, the others fail fast with exit 4.

Each build is a real process reporting to one real Prefect server. Every
process stops itself (SIGSTOP, via TAKEOFF_CACHE_STOP_AT) right before the
command line takes the lock; once all four are lined up they are continued
together, so they reach the lock within milliseconds of each other whatever
their start-up times were. Both the refusal and the losing processes' exit
must come within 2 s of that instant.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from takeoff_cache.cli.main import main
from tests.support.procs import (
    PrefectServer,
    assert_clean,
    change_one_tile,
    copy_sandbox,
    finish,
    start_build,
)

BUILDS = 4
LOCK_HELD = 4
FAIL_FAST_S = 2.0
LINE_UP_TIMEOUT_S = 240


def stopped(proc: subprocess.Popen[str]) -> bool:
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rpartition(")")[2].split()[0] == "T"


@pytest.fixture(scope="module")
def shared(
    prefect_harness: None, demo_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = copy_sandbox(demo_source, tmp_path_factory.mktemp("race") / "shared")
    argv = ["build", "--request", str(root / "request.toml"), "--work-dir", str(root / "work")]
    assert main(argv) == 0
    assert assert_clean(root).version == 1
    return root


def race(server: PrefectServer, root: Path, round_no: int) -> dict[str, object]:
    """One round: change a tile, line four builds up at the lock, let them go together."""
    change_one_tile(root, seed=1000 + round_no)
    version = assert_clean(root).version
    traces = [root.parent / f"round-{round_no}-build-{i}.trace" for i in range(BUILDS)]
    procs = [
        start_build(
            root,
            server.env(
                TAKEOFF_CACHE_STOP_AT="lock.acquire:1",
                TAKEOFF_CACHE_FAULT_TRACE=str(trace),
            ),
        )
        for trace in traces
    ]
    deadline = time.monotonic() + LINE_UP_TIMEOUT_S
    while not all(stopped(p) for p, _ in procs):
        dead = [p.returncode for p, _ in procs if p.poll() is not None]
        assert not dead, f"a build exited before reaching its lock phase: {dead}"
        assert time.monotonic() < deadline, "builds did not line up at the lock phase"
        time.sleep(0.05)
    released, released_wall = time.monotonic(), time.time()
    for proc, _ in procs:
        os.kill(proc.pid, signal.SIGCONT)
    # From the release at the lock phase to each process's exit (outputs are small: no pipe fills).
    exited: dict[int, float] = {}
    while len(exited) < BUILDS:
        for i, (proc, _) in enumerate(procs):
            if i not in exited and proc.poll() is not None:
                exited[i] = time.monotonic() - released
        assert time.monotonic() - released < LINE_UP_TIMEOUT_S, "builds still running"
        time.sleep(0.01)
    runs = [finish(proc, started) for proc, started in procs]
    after_release = [exited[i] for i in range(BUILDS)]

    winners = [r for r in runs if r.returncode == 0]
    losers = [r for r in runs if r.returncode != 0]
    assert len(winners) == 1, [(r.returncode, r.stderr[-500:]) for r in runs]
    assert winners[0].report()["outcome"] == "success"
    for run in losers:
        assert run.returncode == LOCK_HELD, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "another build holds" in lines[0], run.stderr
        assert ".build.lock" in lines[0]
        assert "Traceback" not in run.stderr
    # From the release to the refusal of the lock, as each loser traced it.
    refused_s = [
        refused_at(trace) - released_wall
        for trace, run in zip(traces, runs, strict=True)
        if run.returncode != 0
    ]
    assert max(refused_s) <= FAIL_FAST_S, refused_s
    winner_s = next(t for r, t in zip(runs, after_release, strict=True) if r.returncode == 0)
    loser_s = [t for r, t in zip(runs, after_release, strict=True) if r.returncode != 0]
    assert max(loser_s) <= FAIL_FAST_S, loser_s
    assert assert_clean(root).version == version + 1
    return {
        "lock_refused_after_s": [round(t, 3) for t in refused_s],
        "losers_exit_after_s": [round(t, 2) for t in loser_s],
        "winner_exit_after_s": round(winner_s, 2),
    }


def refused_at(trace: Path) -> float:
    for line in trace.read_text().splitlines():
        name, stamp = line.split()
        if name == "lock.refused":
            return float(stamp)
    raise AssertionError(f"{trace}: the build never reached a refused lock")


def rounds(server: PrefectServer, root: Path, count: int) -> None:
    for round_no in range(count):
        timing = race(server, root, round_no)
        print(f"round {round_no}: {timing}")


def test_of_four_simultaneous_builds_one_runs_and_three_fail_fast_with_exit_4(
    prefect_server: PrefectServer, shared: Path
) -> None:
    rounds(prefect_server, shared, 3)


@pytest.mark.stress
def test_ten_rounds_of_four_simultaneous_builds(
    prefect_server: PrefectServer, shared: Path
) -> None:
    rounds(prefect_server, shared, 10)
