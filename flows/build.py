"""The build-cache flow: the phases of a takeoff-cache build, in order."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.states import Failed

from takeoff_cache import commit, faults
from takeoff_cache.errors import BadTilesError, CacheIOError, TakeoffCacheError
from takeoff_cache.layout import MANIFEST_NAME
from takeoff_cache.preload import preload
from takeoff_cache.report import BuildReport
from takeoff_cache.workdir import resolve_work_dir
from takeoff_cache_prefect.tasks import build as t

# What the runs of this flow ended with, for a caller in the same process (the CLI).
# The run's final state as the API hands it back can lack its data: a state update
# the client retried after the server had already taken it is answered with the
# server's copy, which holds no unpersisted result. The flow itself always knows.
_outcomes: ContextVar[list[dict[str, Any] | TakeoffCacheError] | None] = ContextVar(
    "build_cache_outcomes", default=None
)


@contextmanager
def recorded_outcomes() -> Iterator[list[dict[str, Any] | TakeoffCacheError]]:
    """Collect, in order, the report (or the error) of each run started in this block."""
    outcomes: list[dict[str, Any] | TakeoffCacheError] = []
    token = _outcomes.set(outcomes)
    try:
        yield outcomes
    finally:
        _outcomes.reset(token)


def _record(outcome: dict[str, Any] | TakeoffCacheError) -> None:
    outcomes = _outcomes.get()
    if outcomes is not None:
        outcomes.append(outcome)


class _Phases:
    def __init__(self, report: BuildReport) -> None:
        self.report = report

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except OSError as exc:
            if isinstance(exc, TakeoffCacheError):
                raise
            # The disk failed under library code that had no better name for it.
            raise CacheIOError(f"{name}: {_os_error_text(exc)}") from exc
        finally:
            self.report.phases[name] = round(time.perf_counter() - start, 4)
        faults.checkpoint(f"flow.after_{name}")


def _os_error_text(exc: OSError) -> str:
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc)
    return f"{files}: {reason}" if files else reason


@flow(name="build-cache", validate_parameters=False, persist_result=False, log_prints=False)
def build_cache(
    corpus: str | None = None,
    bbox: list[float] | str | None = None,
    zoom_levels: list[int] | str | None = None,
    sector_class: str | None = None,
    backbones: str | None = None,
    cache_root: str | None = None,
    key: str | None = None,
    trust: str | None = None,
    precision: str = "fp32",
    calibration: str | None = None,
    takeoff_origin: list[float] | str | None = None,
    flight_id: str | None = None,
    work_dir: str | None = None,
    backend: str = "auto",
    coverage: str = "strict",
    expires_in_s: float | None = None,
    dask_address: str | None = None,
) -> dict[str, Any] | State:
    """Build (or confirm) the signed takeoff cache for one request; return the build report."""
    started = time.perf_counter()
    report = BuildReport()
    phase = _Phases(report)
    raw = {
        "corpus": corpus,
        "bbox": bbox,
        "zoom_levels": zoom_levels,
        "sector_class": sector_class,
        "backbones": backbones,
        "cache_root": cache_root,
        "key": key,
        "trust": trust,
        "precision": precision,
        "calibration": calibration,
        "takeoff_origin": takeoff_origin,
        "flight_id": flight_id,
    }
    held = None
    staging: Path | None = None
    committed = False
    settle_progress: Callable[[], None] | None = None
    try:
        with phase("validate"):
            if coverage not in ("strict", "lenient"):
                from takeoff_cache.errors import InvalidRequestError

                raise InvalidRequestError(f"coverage: must be strict or lenient; got {coverage!r}")
            work = resolve_work_dir(work_dir)
            validated = t.validate(raw, backend, work)
        root = validated.request.cache_root
        with phase("lock"):
            held = t.lock(validated)
        with phase("select"):
            selection = t.select(validated, work)
        report.tiles = len(selection.tiles)
        if not selection.tiles:
            report.failure_reason = (
                "no tiles of the corpus intersect the bbox at zoom levels "
                f"{list(validated.request.zoom_levels)}: download tiles for this area first"
            )
            return _finish(report, started, cache_root)
        with phase("identity"):
            build_id = t.build_identity(validated, selection.fingerprint)
        report.manifest_hash = build_id
        with phase("noop"):
            previous, is_noop = t.noop_check(validated, build_id)
        if is_noop:
            report.outcome = "idempotent_no_op"
            report.descriptors_reused = len(selection.tiles)
            report.engines_reused = len(validated.backbones)
            report.manifest_path = str(root / MANIFEST_NAME)
            return _finish(report, started, cache_root)
        # Only a build with work to do loads the engine runtime and faiss (in the
        # background, while the engines are settled) and the task modules that
        # use them (numpy, Pillow).
        preload(validated.backend.runtime, "faiss")
        from takeoff_cache_prefect.tasks import descriptors as td
        from takeoff_cache_prefect.tasks import engines as te

        settle_progress = td.settle_progress

        staging = commit.prepare_staging(root)
        with phase("engines"):
            records, described, staged = te.engines(validated, work, staging)
            report.precision_drift = te.int8_drift(validated, records, work)
        report.engines_built = sum(r.built for r in records)
        report.engines_reused = len(records) - report.engines_built
        with phase("descriptors"):
            spread = None
            if dask_address:
                spread = td.spread_descriptors(validated, selection, records, work, dask_address)
            embedded, index_described, index_staged = td.descriptors_phase(
                validated, selection, records, work, staging
            )
        # Descriptors embedded on the cluster were found stored by the phase itself.
        generated = embedded.generated + (spread.generated if spread else 0)
        report.descriptors_generated = generated
        report.descriptors_reused = len(selection.tiles) - generated
        described += index_described
        staged += index_staged
        new_paths = {a.path for a in described}
        with phase("manifest"):
            manifest_bytes = t.manifest(
                validated, build_id, t.untracked(selection), described, expires_in_s
            )
        with phase("coverage"):
            offending = t.coverage_check(validated, new_paths, previous, coverage == "strict")
        report.warnings += [f"coverage: {p} is not listed in the manifest" for p in offending]
        with phase("commit"):
            committed = True  # from here on, a failure is settled by commit.recover
            t.commit_cache(validated, manifest_bytes, staged, previous, new_paths)
        report.outcome = "success"
        report.manifest_path = str(root / MANIFEST_NAME)
        td.prune_work_folder(work)
        return _finish(report, started, cache_root)
    except BadTilesError as exc:
        report.failure_reason = str(exc)
        report.descriptors_generated = exc.generated
        report.descriptors_reused = exc.reused
        return _finish(report, started, cache_root)
    except TakeoffCacheError as exc:
        report.failure_reason = str(exc)
        _finish(report, started, cache_root)
        _record(exc)
        raise
    finally:
        if held is not None:
            if staging is not None:
                if committed:
                    # If the disk still fails, staging stays and verify still
                    # accepts the cache; the next build's lock phase settles it.
                    with contextlib.suppress(OSError):
                        commit.recover(validated.request.cache_root, validated.trusted)
                else:
                    commit.discard_staging(validated.request.cache_root)
            held.release()
        if settle_progress is not None:
            settle_progress()


def _finish(report: BuildReport, started: float, cache_root: str | None) -> dict[str, Any] | State:
    report.elapsed_s = round(time.perf_counter() - started, 4)
    # Submitted, not awaited: the artifact is written while the run winds down
    # (the flow's task runner waits for it before the run ends). A lost UI
    # artifact must not change the build's outcome, so its future is never read.
    with contextlib.suppress(Exception):
        t.publish_report.submit(report, os.path.abspath(cache_root or "."))
    data = report.to_json()
    _record(data)
    if report.outcome == "failure":
        # A soft failure (no tiles, bad tiles) shows as a Failed run with its reason
        # in the UI; callers asking for the state still get the report as its data.
        return Failed(message=report.failure_reason, data=data)
    return data
