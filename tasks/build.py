"""One Prefect task per build phase; the bodies call the library and return small values.

This module holds the phases every run goes through, up to the no-op check,
and the ones after the index (manifest, coverage, commit, report). The
engines and descriptors phases live in :mod:`tasks.engines` and
:mod:`tasks.descriptors`, which the flow imports only when a build has work
to do: they pull in numpy, ONNX Runtime, Pillow and faiss, and a no-op
re-run needs none of them.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from takeoff_cache import __version__
from takeoff_cache.build import commit, coverage, front, noop
from takeoff_cache.build.lock import ExclusiveLock
from takeoff_cache.build.options import BuildOptions
from takeoff_cache.build.readiness import Thresholds, covered_by, headline, verdict
from takeoff_cache.build.report import BuildReport
from takeoff_cache.build.validate import ValidatedRequest
from takeoff_cache.tiles import corpus
from takeoff_cache.trust.manifest import (
    Artifact,
    Manifest,
    compose_signed,
    new_lineage,
    sign_manifest,
)
from takeoff_cache_prefect import context
from takeoff_cache_prefect.artifacts import artifact_key, embedded_map, report_block

if TYPE_CHECKING:  # the self-test's module pulls in numpy, Pillow and faiss
    from takeoff_cache_prefect.tasks.selftest import SelfTested


# The front's steps (takeoff_cache.build.front), each a task.
@task(name="validate", task_run_name="validate", cache_policy=NO_CACHE, persist_result=False)
def validate(raw: dict[str, Any], options: BuildOptions) -> ValidatedRequest:
    return front.validate_step(raw, options)


@task(name="lock", task_run_name="lock", cache_policy=NO_CACHE, persist_result=False)
def lock(validated: ValidatedRequest, run: ExitStack) -> ExclusiveLock:
    """Hold the cache's lock until ``run`` ends, adopting the one handed over."""
    return front.lock_step(validated, run, context.held_locks.get())


@task(name="staging", task_run_name="staging", cache_policy=NO_CACHE, persist_result=False)
def open_staging(validated: ValidatedRequest, run: ExitStack) -> Path:
    """A fresh staging folder in the cache root, settled when ``run`` ends."""
    return run.enter_context(commit.staging(validated.request.cache_root, validated.trusted))


@task(name="select", task_run_name="select", cache_policy=NO_CACHE, persist_result=False)
def select(validated: ValidatedRequest, options: BuildOptions) -> corpus.TileSelection:
    return front.select_step(validated, options)


def no_tiles_reason(validated: ValidatedRequest) -> str:
    where = "bbox" if validated.request.area is None else "area"
    return (
        f"no tiles of the corpus intersect the {where} at zoom levels "
        f"{list(validated.request.zoom_levels)}: download tiles for this area first"
    )


@task(name="identity", task_run_name="identity", cache_policy=NO_CACHE, persist_result=False)
def build_identity(validated: ValidatedRequest, fingerprint: str) -> str:
    return front.identity_step(validated, fingerprint)


@task(name="noop", task_run_name="noop", cache_policy=NO_CACHE, persist_result=False)
def noop_check(validated: ValidatedRequest, build_id: str) -> tuple[Manifest | None, bool]:
    return front.noop_step(validated, build_id)


# The front as the flow runs it: each step a task.
FRONT = front.Steps(validate, lock, select, build_identity, noop_check)


@task(name="manifest", task_run_name="manifest", cache_policy=NO_CACHE, persist_result=False)
def manifest(
    validated: ValidatedRequest,
    build_id: str,
    selection: corpus.TileSelection,
    described: list[Artifact],
    options: BuildOptions,
    tested: SelfTested,
    ready: dict[str, Any] | None = None,
) -> bytes:
    root = validated.request.cache_root
    now = datetime.now(UTC)
    expires_in_s = options.expires_in_s
    # The cache's lineage outlives every rebuild of it; only a first build (or one
    # over a manifest that no trusted key signed) starts a new one.
    current = noop.current_manifest(root, validated.trusted)
    signed = compose_signed(
        version=noop.previous_version(root) + 1,
        lineage=(current.lineage if current else None) or new_lineage(),
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s else None,
        build_identity=build_id,
        request=validated.request.to_json(),
        host=validated.host,
        corpus_fingerprint=selection.fingerprint,
        tile_count=len(selection.tiles),
        artifacts=described,
        tool_version=__version__,
        self_test=tested.signed,
        ready=ready,
    )
    return sign_manifest(signed, validated.signer)


@task(name="readiness", task_run_name="readiness", cache_policy=NO_CACHE, persist_result=False)
def readiness(
    validated: ValidatedRequest,
    selection: corpus.TileSelection,
    options: BuildOptions,
    self_test: dict[str, Any] | None,
    tested: SelfTested | None = None,
) -> dict[str, Any]:
    """The readiness verdict (SPEC §11): the selection's coverage of the area and the
    route, and the self-test's figures, judged on the options' thresholds. With the
    self-test's map (``tested``), the map is drawn again with the flight on it."""
    req = validated.request
    tiles = [(t.z, t.x, t.y) for t in selection.tiles]
    covered = covered_by(req, tiles)
    thresholds = Thresholds(options.min_coverage, options.min_recall, options.allow_gaps)
    ready = verdict(covered, self_test, thresholds, gated=options.gated)
    if tested is not None and tested.coverage_map and tested.signed and req.route is not None:
        _flight_map(validated, tiles, covered, tested, ready)
    return ready


def _flight_map(
    validated: ValidatedRequest,
    tiles: list[tuple[int, int, int]],
    covered: coverage.TileCoverage,
    tested: SelfTested,
    ready: dict[str, Any],
) -> None:
    """The self-test's map with the flight drawn on it: route, waypoints, takeoff,
    holes under the route, the weakest stretch (SPEC §11)."""
    from takeoff_cache.localize.coverage_map import short_path, write_coverage_map
    from takeoff_cache.localize.selftest import queries_from_signed

    req = validated.request
    signed, route_cov = tested.signed or {}, covered.route
    weakest = ((tested.summary or {}).get("route") or {}).get("weakest")
    weak = [(weakest["from_km"], weakest["to_km"])] if isinstance(weakest, dict) else []
    loc = ready.get("localization") or {}
    where = "along the route" if loc.get("source") == "route" else "over the area"
    figures = f"; Recall@1 {float(loc['recall_at_1'] or 0):.2f} {where}" if loc else ""
    write_coverage_map(
        Path(str(tested.coverage_map)),
        bbox=req.bbox.as_tuple(),
        tiles=tiles,
        missing=[t for z in covered.per_zoom for t in z.holes],
        area=req.area,
        queries=queries_from_signed(signed.get("queries")),
        title=f"takeoff cache at {short_path(req.cache_root)}",
        subtitle=headline(ready) + figures,
        route=req.route,
        route_holes=[h.tile for h in route_cov.holes] if route_cov is not None else [],
        weak=weak,
    )


@task(name="coverage", task_run_name="coverage", cache_policy=NO_CACHE, persist_result=False)
def coverage_check(
    validated: ValidatedRequest, new_paths: set[str], previous: Manifest | None, strict: bool
) -> list[str]:
    root = validated.request.cache_root
    old_paths = {a.path for a in previous.artifacts} if previous else set()
    offending = coverage.check_coverage(root, new_paths, old_paths)
    if strict:
        coverage.enforce(root, offending)
    return offending


@task(name="commit", task_run_name="commit", cache_policy=NO_CACHE, persist_result=False)
def commit_cache(
    validated: ValidatedRequest,
    manifest_bytes: bytes,
    staged: list[tuple[str, str]],
    previous: Manifest | None,
    new_paths: set[str],
) -> list[str]:
    return commit.commit(validated.request.cache_root, manifest_bytes, staged, previous, new_paths)


@task(name="report", task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def publish_report(report: BuildReport, cache_root: str) -> None:
    create_markdown_artifact(
        report.markdown() + embedded_map(report.coverage_map) + report_block(report.to_json()),
        key=artifact_key("build-report", Path(cache_root)),
        description=f"takeoff-cache build report for {cache_root}",
    )
