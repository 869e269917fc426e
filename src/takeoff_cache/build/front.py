"""The front of a build: validate, lock, select, identity and the no-op check.

Written once, run twice. The command line runs it first, without Prefect, so a
typo in a flag is refused, a held lock is reported and (without a configured
Prefect API) a no-op re-run is answered in well under a second, before Prefect
starts. When there is work, the build-cache flow runs the same front with each
step as a task, and its lock step adopts the lock the command line took, handed
over explicitly (``held``): flock locks belong to an open file, so a second open
of the same lock in this process would be refused.

The lock is taken only after validation: the lock file is the first write to a
cache root, and an invalid request (an untrusted key) must leave it untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from takeoff_cache.build import commit, identity, noop
from takeoff_cache.build.lock import BuildLock, ExclusiveLock, adopt_or_acquire
from takeoff_cache.build.options import BuildOptions
from takeoff_cache.build.report import BuildReport
from takeoff_cache.build.validate import ValidatedRequest, validate
from takeoff_cache.core import workdir
from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache.tiles import selection as selection_cache
from takeoff_cache.tiles.corpus import TileSelection
from takeoff_cache.trust.manifest import Manifest


def validate_step(raw: dict[str, Any], options: BuildOptions) -> ValidatedRequest:
    return validate(raw, options.backend, options.work_dir)


def lock_step(
    validated: ValidatedRequest, stack: ExitStack, held: Iterable[ExclusiveLock] = ()
) -> ExclusiveLock:
    """Hold the cache's lock until ``stack`` ends, adopting one of ``held`` if it is it."""
    root = validated.request.cache_root
    lock = stack.enter_context(adopt_or_acquire(BuildLock(root), held))
    # A build killed mid-commit left staging behind; settle it before reading the cache.
    commit.recover(root, validated.trusted)
    return lock


def select_step(validated: ValidatedRequest, options: BuildOptions) -> TileSelection:
    req = validated.request
    remembered = workdir.selections_dir(options.work_dir)
    return selection_cache.select_tiles_cached(
        req.corpus, req.bbox.as_tuple(), req.zoom_levels, remembered, area=req.area
    )


def identity_step(validated: ValidatedRequest, fingerprint: str) -> str:
    return identity.build_identity(validated, fingerprint)


def noop_step(validated: ValidatedRequest, build_id: str) -> tuple[Manifest | None, bool]:
    """The cache's current manifest (None if none verifies), and whether it is this build."""
    root = validated.request.cache_root
    current = noop.current_manifest(root, validated.trusted)
    return current, noop.is_noop(root, current, build_id, validated.trusted)


@dataclass(frozen=True)
class Steps:
    """How a caller runs each step: the functions above, or tasks around them."""

    validate: Callable[[dict[str, Any], BuildOptions], ValidatedRequest]
    lock: Callable[[ValidatedRequest, ExitStack], ExclusiveLock]
    select: Callable[[ValidatedRequest, BuildOptions], TileSelection]
    identity: Callable[[ValidatedRequest, str], str]
    noop: Callable[[ValidatedRequest, str], tuple[Manifest | None, bool]]


@dataclass(frozen=True)
class Front:
    validated: ValidatedRequest
    selection: TileSelection
    build_id: str | None  # None when the selection holds no tiles: nothing to build
    previous: Manifest | None
    is_noop: bool
    lock: ExclusiveLock


def run_front(
    raw: dict[str, Any],
    options: BuildOptions,
    steps: Steps,
    stack: ExitStack,
    phase: Callable[[str], AbstractContextManager[Any]],
) -> Front:
    """Run the front's steps in order, each within ``phase(name)``; the lock is held
    until ``stack`` ends. Stops after select when the selection holds no tiles."""
    with phase("validate"):
        validated = steps.validate(raw, options)
    with phase("lock"):
        lock = steps.lock(validated, stack)
    with phase("select"):
        selection = steps.select(validated, options)
    if not selection.tiles:
        return Front(validated, selection, None, None, False, lock)
    with phase("identity"):
        build_id = steps.identity(validated, selection.fingerprint)
    with phase("noop"):
        previous, is_noop = steps.noop(validated, build_id)
    return Front(validated, selection, build_id, previous, is_noop, lock)


@dataclass(frozen=True)
class Precheck:
    validated: ValidatedRequest
    # The cache's lock, held until the precheck ends: hand it to the flow.
    lock: ExclusiveLock
    # The report a no-op run ends with; None when there is work to do (or no tiles:
    # the flow reports that, as a failed run).
    noop_report: BuildReport | None
    # The manifest in force, when one verifies with a trusted key, and the tiles
    # the request selects: what a no-op's readiness is judged on again.
    previous: Manifest | None = None
    selection: TileSelection | None = None


@contextmanager
def prechecked(raw: dict[str, Any], options: BuildOptions) -> Iterator[Precheck]:
    """Run the front here, holding the cache's lock within; say whether it is a no-op."""
    started = time.perf_counter()
    phases: dict[str, float] = {}

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        mark = time.perf_counter()
        try:
            yield
        finally:
            phases[name] = round(time.perf_counter() - mark, 4)

    steps = Steps(validate_step, lock_step, select_step, identity_step, noop_step)
    with ExitStack() as stack:
        front = run_front(raw, options, steps, stack, timed)
        report = None
        if front.is_noop:
            report = BuildReport(
                outcome="idempotent_no_op",
                engines_reused=len(front.validated.backbones),
                descriptors_reused=len(front.selection.tiles),
                tiles=len(front.selection.tiles),
                build_identity=front.build_id,
                manifest_path=str(front.validated.request.cache_root / MANIFEST_NAME),
                phases=phases,
                ready=_noop_verdict(front, options),
            )
            if report.ready is not None and not report.ready["ok"] and options.gated:
                from takeoff_cache.build.readiness import not_ready_reason

                # As the flow ends a gated no-op that is not ready: the cache stands.
                report.outcome, report.failure_reason = "failure", not_ready_reason(report.ready)
            report.elapsed_s = round(time.perf_counter() - started, 4)
        yield Precheck(front.validated, front.lock, report, front.previous, front.selection)


def _noop_verdict(front: Front, options: BuildOptions) -> dict[str, Any] | None:
    """A no-op's readiness verdict, as the flow gives it: the one the cache was signed
    with, judged again on this run's thresholds only when they gate (a plain no-op
    loads no area code)."""
    previous = front.previous.signed if front.previous is not None else {}
    if not options.gated:
        ready = previous.get("ready")
        return ready if isinstance(ready, dict) else None
    from takeoff_cache.build.readiness import judge

    tiles = [(t.z, t.x, t.y) for t in front.selection.tiles]
    return judge(front.validated.request, tiles, options, previous.get("self_test"))
