"""kill -9 at precise points of real builds: the cache still verifies, the lock is free,
and the next build succeeds and leaves nothing unlisted.

Every killed build is a real ``takeoff-cache build`` process reporting to one
real Prefect server; ``TAKEOFF_CACHE_KILL_AT`` makes it SIGKILL itself at a
named fault point (see takeoff_cache/core/faults.py). The build that follows runs
in-process through the same CLI entry point.

The default run kills at a fixed list of points; ``make stress`` kills at every
point (and every occurrence of it) a traced build passes, in four scenarios,
also during the recovery of a killed build, and at random instants.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from takeoff_cache.cli.main import main
from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.errors import VerificationError
from tests.support.cli import run_cli
from tests.support.procs import (
    PrefectServer,
    Run,
    assert_clean,
    cache_of,
    change_model,
    change_one_tile,
    copy_sandbox,
    finish,
    lock_is_free,
    run_build,
    settle_corpus,
    start_build,
    verified,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")

WORKERS = 2
KILLED = -signal.SIGKILL

# Scenarios, each starting from a copy of one base: "update" and "tile" from a cache
# holding a first successful build (version 1), "first" from an empty cache root.
#   update: one tile re-rendered and the keypoints model retrained: one engine compiled,
#           one tile embedded, a new index; the old engine, index and tile map deleted.
#   tile:   only the tile: a new index, the engines reused.
#   zoom:   --zoom 16 only: fewer tiles, nothing embedded, a new index.
#   first:  the first build of an empty cache (two compiles, three descriptor batches).
SCENARIOS = ("update", "tile", "zoom", "first")

# One point per distinct state a build passes through, in the order an update reaches them.
DEFAULT_POINTS = (
    "lock.acquire",  # validated, nothing written
    "lock.acquired",
    "commit.staging",
    "store.compile",
    "store.rename",  # engine compiled to its temp file, not yet renamed into the store
    "store.record.write",  # engine in the store, its record (digest, key) not yet written
    "descriptors.batch_stored",
    "descriptors.index_write",
    "descriptors.map_write",  # new index renamed into the work folder, its tile map not yet
    "features.batch_stored",  # the changed tile's local features in the feature store
    "features.file.rename",  # the features file written to its temp file, not yet renamed
    "commit.pending.write",  # manifest signed and coverage checked, nothing committed
    "commit.pending.rename",  # pending manifest written to its temp file, not yet renamed
    "fsutil.copy:2",  # pending manifest in staging, one artifact copied in beside it
    "commit.move:1",  # every artifact copied into staging, nothing moved
    "commit.move:3",  # two artifacts moved into the cache root
    "commit.retire",  # every artifact moved, old manifest not yet kept
    "commit.switch",  # old manifest kept in staging, new one not yet in force
    "commit.delete:1",  # new manifest in force (the commit point), nothing deleted
    "commit.delete:3",  # two old files deleted
    "commit.cleanup",  # every old file deleted, staging still there
    "commit.done",  # committed and cleaned up, lock not yet released
)
# Points past the commit point (the rename of Manifest.json): the new cache is in force.
AFTER_COMMIT_POINT = ("commit.delete", "commit.cleanup", "commit.done")
# Killed once mid-commit, then killed again while the next build recovers from it.
DEFAULT_DOUBLE_KILLS = (
    ("commit.move:4", "recover.remove:2"),
    ("commit.delete:2", "recover.cleanup"),
)
FIRST_BUILD_POINTS = ("store.rename:2", "commit.move:2")


@dataclass(frozen=True)
class Case:
    scenario: str
    points: tuple[str, ...]  # one killed build per point, in order

    def __str__(self) -> str:
        return f"{self.scenario}-{'-then-'.join(self.points)}"


@dataclass
class Observed:
    """The cache as a pre-flight check would find it right after a kill."""

    version: int | None  # version of the manifest that verifies, None if none does
    problems: list[str]
    has_manifest: bool
    lock_free: bool


@dataclass
class Outcome:
    root: Path
    flags: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)
    observed: list[Observed] = field(default_factory=list)


def observe(root: Path) -> Observed:
    lock_free = lock_is_free(cache_of(root))
    has_manifest = (cache_of(root) / MANIFEST_NAME).exists()
    try:
        return Observed(verified(root).version, [], has_manifest, lock_free)
    except VerificationError as exc:
        return Observed(None, exc.problems, has_manifest, lock_free)


def prepare(
    scenario: str, base: Path, empty: Path, dest: Path, *, settled: bool = False
) -> tuple[str, ...]:
    """Copy the scenario's starting point to ``dest``; return the build flags it needs.

    ``settled``: see :func:`settle_corpus` (the build then passes the
    ``selection.entry`` points).
    """
    copy_sandbox(empty if scenario == "first" else base, dest)
    if scenario in ("update", "tile"):
        change_one_tile(dest)
    if scenario == "update":
        change_model(dest)
    if settled:
        settle_corpus(dest)
    return ("--zoom", "16") if scenario == "zoom" else ()


class Kills:
    """Runs killed builds on two worker threads, ahead of the tests that check them."""

    def __init__(self, server: PrefectServer, base: Path, empty: Path, tmp: Path) -> None:
        self.server, self.base, self.empty, self.tmp = server, base, empty, tmp
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="kill")
        self._jobs: dict[Case, Future[Outcome]] = {}

    def submit(self, case: Case) -> Future[Outcome]:
        if case not in self._jobs:
            self._jobs[case] = self._pool.submit(self._run, case)
        return self._jobs[case]

    def get(self, case: Case) -> Outcome:
        return self.submit(case).result()

    def _run(self, case: Case) -> Outcome:
        dest = self.tmp / str(case).replace(":", "_")
        settled = any(point.startswith("selection.") for point in case.points)
        flags = prepare(case.scenario, self.base, self.empty, dest, settled=settled)
        outcome = Outcome(dest, flags)
        for point in case.points:
            env = self.server.env(TAKEOFF_CACHE_KILL_AT=point)
            outcome.runs.append(run_build(dest, env, *flags))
            outcome.observed.append(observe(dest))
        return outcome

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Trace:
    points: list[str]  # "name:N" in the order one unkilled build reached them
    wall_s: float

    def after_commit_point(self, point: str) -> bool:
        name, _, nth = point.partition(":")
        point = f"{name}:{nth or 1}"
        assert point in self.points, f"{point} is not reached; the build reaches {self.points}"
        return self.points.index(point) > self.points.index("commit.switch:1")


def traced_build(
    server: PrefectServer, scenario: str, base: Path, empty: Path, dest: Path
) -> Trace:
    flags = prepare(scenario, base, empty, dest, settled=True)
    trace_file = dest.parent / f"{dest.name}.trace"
    run = run_build(dest, server.env(TAKEOFF_CACHE_FAULT_TRACE=str(trace_file)), *flags)
    assert run.returncode == 0, run.stderr
    assert run.report()["outcome"] == "success"
    assert_clean(dest)
    seen: dict[str, int] = {}
    points = []
    for line in trace_file.read_text().splitlines():
        name = line.split()[0]
        seen[name] = seen.get(name, 0) + 1
        points.append(f"{name}:{seen[name]}")
    return Trace(points, run.wall_s)


@pytest.fixture(scope="module")
def sandboxes(
    prefect_harness: None, demo_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(a copy holding a first successful build, a copy with an empty cache root)."""
    tmp = tmp_path_factory.mktemp("crash")
    empty = copy_sandbox(demo_source, tmp / "empty")
    base = copy_sandbox(demo_source, tmp / "base")
    argv = ["build", "--request", str(base / "request.toml"), "--work-dir", str(base / "work")]
    assert main(argv) == 0
    assert assert_clean(base).version == 1
    return base, empty


@pytest.fixture(scope="module")
def kills(
    request: pytest.FixtureRequest,
    prefect_server: PrefectServer,
    sandboxes: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Kills]:
    runner = Kills(prefect_server, *sandboxes, tmp_path_factory.mktemp("kills"))
    # Start every selected case now, so killed builds run while earlier cases are checked.
    for item in request.session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if isinstance(case, Case) and item.module is request.module:
            runner.submit(case)
    yield runner
    runner.close()


def check_outcome(
    capsys: pytest.CaptureFixture[str], outcome: Outcome, expect: list[int | None], final: int
) -> None:
    """Every build died by SIGKILL at its point and left what ``expect`` says; then the
    next build succeeds."""
    for run, seen, version in zip(outcome.runs, outcome.observed, expect, strict=True):
        assert run.returncode == KILLED, (
            f"build was not killed at its point (exit {run.returncode}): {run.stderr[-1500:]}"
        )
        assert seen.lock_free, "the lock is still held after the build was killed"
        assert seen.version == version, (version, seen)
        if version is None:
            assert not seen.has_manifest, seen
    next_build_succeeds(capsys, outcome.root, outcome.flags, expect[-1], final)


def next_build_succeeds(
    capsys: pytest.CaptureFixture[str],
    root: Path,
    flags: tuple[str, ...],
    found: int | None,
    final: int,
) -> None:
    """The build after a kill succeeds and leaves exactly what its manifest lists."""
    result = run_cli(
        capsys,
        "build",
        "--request",
        str(root / "request.toml"),
        "--work-dir",
        str(root / "work"),
        "--json",
        *flags,
    )
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    report = result.json()
    # A kill after the commit point leaves the new cache in force: nothing is left to do.
    assert report["outcome"] == ("idempotent_no_op" if found == final else "success"), report
    manifest = assert_clean(root)
    assert manifest.version == final
    assert manifest.build_identity == report["build_identity"]


def expected_update_version(point: str) -> int:
    return 2 if point.partition(":")[0] in AFTER_COMMIT_POINT else 1


@pytest.mark.parametrize("case", [Case("update", (p,)) for p in DEFAULT_POINTS], ids=str)
def test_a_build_killed_at_a_point_leaves_a_cache_that_verifies(
    capsys: pytest.CaptureFixture[str], kills: Kills, case: Case
) -> None:
    expect = [expected_update_version(case.points[0])]
    check_outcome(capsys, kills.get(case), expect, final=2)


@pytest.mark.parametrize("case", [Case("update", p) for p in DEFAULT_DOUBLE_KILLS], ids=str)
def test_a_build_killed_while_recovering_from_a_kill_leaves_a_cache_that_verifies(
    capsys: pytest.CaptureFixture[str], kills: Kills, case: Case
) -> None:
    # Recovery rolls back (or forward) under the lock, so the second kill finds the
    # version the first one left.
    version = expected_update_version(case.points[0])
    check_outcome(capsys, kills.get(case), [version, version], final=2)


@pytest.mark.parametrize("case", [Case("first", (p,)) for p in FIRST_BUILD_POINTS], ids=str)
def test_a_first_build_killed_before_its_commit_leaves_no_manifest_and_the_next_succeeds(
    capsys: pytest.CaptureFixture[str], kills: Kills, case: Case
) -> None:
    check_outcome(capsys, kills.get(case), [None], final=1)


def random_kills(
    capsys: pytest.CaptureFixture[str],
    server: PrefectServer,
    sandboxes: tuple[Path, Path],
    tmp: Path,
    duration_s: float,
    count: int,
    seed: int,
) -> dict[str, int]:
    """Kill update builds at instants drawn uniformly over a whole build's measured duration."""
    rng = random.Random(seed)
    tally: dict[str, int] = {}
    for i in range(count):
        dest = tmp / f"random-{seed}-{i}"
        prepare("update", *sandboxes, dest)
        delay = rng.uniform(0.0, duration_s)
        proc, started = start_build(dest, server.env())
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        run = finish(proc, started)
        seen = observe(dest)
        assert seen.lock_free
        if run.returncode == 0:  # finished before the kill came
            assert seen.version == 2
        else:
            assert run.returncode == KILLED, run.stderr
            assert seen.version in (1, 2), seen
        # Recorded for the summary: which side of the commit point each kill landed.
        label = "finished" if run.returncode == 0 else f"killed-at-v{seen.version}"
        tally[label] = tally.get(label, 0) + 1
        next_build_succeeds(capsys, dest, (), seen.version, final=2)
    return tally


def test_builds_killed_at_random_instants_leave_caches_that_verify(
    capsys: pytest.CaptureFixture[str],
    prefect_server: PrefectServer,
    sandboxes: tuple[Path, Path],
    kills: Kills,
    tmp_path: Path,
) -> None:
    # Killed just before it exits, this build measured how long a whole update takes.
    duration = kills.get(Case("update", ("commit.done",))).runs[0].wall_s
    tally = random_kills(capsys, prefect_server, sandboxes, tmp_path, duration, 3, seed=1)
    assert sum(tally.values()) == 3


# --- make stress -----------------------------------------------------------------------------


@pytest.mark.stress
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_kill_at_every_point_and_occurrence_leaves_a_cache_that_verifies(
    capsys: pytest.CaptureFixture[str],
    prefect_server: PrefectServer,
    sandboxes: tuple[Path, Path],
    kills: Kills,
    tmp_path: Path,
    scenario: str,
) -> None:
    trace = traced_build(prefect_server, scenario, *sandboxes, tmp_path / "trace")
    final = 1 if scenario == "first" else 2
    cases = {p: Case(scenario, (p,)) for p in trace.points}
    for case in cases.values():
        kills.submit(case)
    failures = []
    for point, case in cases.items():
        after = trace.after_commit_point(point)
        expect: int | None = final if after else (None if scenario == "first" else 1)
        try:
            check_outcome(capsys, kills.get(case), [expect], final=final)
        except AssertionError as exc:
            failures.append(f"{point}: {exc}")
    print(f"{scenario}: {len(cases)} kill points, {len(failures)} failed")
    assert not failures, "\n".join(failures)


@pytest.mark.stress
def test_a_kill_during_recovery_of_every_mid_commit_kill_leaves_a_cache_that_verifies(
    capsys: pytest.CaptureFixture[str],
    prefect_server: PrefectServer,
    sandboxes: tuple[Path, Path],
    kills: Kills,
    tmp_path: Path,
) -> None:
    trace = traced_build(prefect_server, "update", *sandboxes, tmp_path / "trace")
    start = trace.points.index("commit.move:1")
    stop = trace.points.index("commit.cleanup:1")
    mid_commit = trace.points[start : stop + 1]
    cases = [
        Case("update", (first, second))
        for first in mid_commit
        for second in (
            "recover.remove:1",
            "recover.remove:2",
            "recover.remove:3",
            "recover.cleanup",
        )
    ]
    for case in cases:
        kills.submit(case)
    failures = []
    for case in cases:
        version = 2 if trace.after_commit_point(case.points[0]) else 1
        try:
            check_outcome(capsys, kills.get(case), [version, version], final=2)
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
    print(f"recovery: {len(cases)} double kills, {len(failures)} failed")
    assert not failures, "\n".join(failures)


@pytest.mark.stress
def test_many_builds_killed_at_random_instants_leave_caches_that_verify(
    capsys: pytest.CaptureFixture[str],
    prefect_server: PrefectServer,
    sandboxes: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    trace = traced_build(prefect_server, "update", *sandboxes, tmp_path / "trace")
    tally = random_kills(capsys, prefect_server, sandboxes, tmp_path, trace.wall_s, 30, seed=2)
    print(f"random kills: {tally}")


def test_a_kill_mid_commit_is_settled_even_after_the_new_manifest_expired(
    capsys: pytest.CaptureFixture[str],
    prefect_server: PrefectServer,
    sandboxes: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """The pending manifest in staging vouches for the files it brought in, and names
    them for removal, whether or not its own lifetime has run out since."""
    dest = tmp_path / "expiring"
    prepare("update", *sandboxes, dest)
    env = prefect_server.env(TAKEOFF_CACHE_KILL_AT="commit.move:3")
    run = run_build(dest, env, "--expires-in", "1s")
    assert run.returncode == KILLED, run.stderr
    time.sleep(2.5)
    seen = observe(dest)
    assert seen.lock_free
    assert seen.version == 1, seen.problems
    next_build_succeeds(capsys, dest, (), 1, final=2)
