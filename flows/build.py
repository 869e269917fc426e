"""The build-cache flow: the phases of a takeoff-cache build (SPEC §3), in order."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from takeoff_cache_prefect.flows.phases import BuildRun
from takeoff_cache_prefect.tasks import build as t

from takeoff_cache.build import front
from takeoff_cache.build.options import OPTION_FIELDS, build_options
from takeoff_cache.build.preload import preload
from takeoff_cache.build.readiness import not_ready_reason
from takeoff_cache.build.request import FIELDS
from takeoff_cache.core.layout import MANIFEST_NAME
from takeoff_cache_prefect.results import json_parameters, untracked


@json_parameters
@flow(name="build-cache", validate_parameters=False, persist_result=False, log_prints=False)
def build_cache(
    corpus: str | None = None,
    bbox: list[float] | str | None = None,
    zoom_levels: list[int] | str | None = None,
    sector_class: str | None = None,
    backbones: str | None = None,
    precision: str = "fp32",
    calibration: str | None = None,
    cache_root: str | None = None,
    key: str | None = None,
    trust: str | None = None,
    takeoff_origin: list[float] | str | None = None,
    flight_id: str | None = None,
    area: dict[str, Any] | str | None = None,
    route: dict[str, Any] | str | None = None,
    work_dir: str | None = None,
    backend: str = "auto",
    coverage: str = "strict",
    expires_in_s: float | None = None,
    dask_address: str | None = None,
    self_test: int = 200,
    min_recall: float | None = None,
    min_coverage: float | None = None,
    allow_gaps: bool | None = None,
    require_ready: bool | None = None,
) -> dict[str, Any] | State:
    """Build (or confirm) the signed takeoff cache for one request; return the build report."""
    params = dict(locals())
    with BuildRun(cache_root) as run:
        report = run.report
        with run.phase("validate"):
            options = build_options(**{f.name: params[f.name] for f in OPTION_FIELDS})
        raw = {name: params[name] for name in FIELDS}
        done = front.run_front(raw, options, t.FRONT, run, run.phase)
        validated, selection, previous = done.validated, done.selection, done.previous
        root = validated.request.cache_root
        report.tiles = len(selection.tiles)
        if done.build_id is None:
            return run.end(failure_reason=t.no_tiles_reason(validated))
        report.build_identity = done.build_id
        if done.is_noop:
            # The cache stands. Its verdict is the one it was signed with, judged again on
            # this run's thresholds only when they gate (a plain no-op loads no area code).
            report.ready = previous.signed.get("ready") if previous else None
            if options.gated:
                tested_before = previous.signed.get("self_test") if previous else None
                with run.phase("readiness"):
                    report.ready = t.readiness(validated, selection, options, tested_before)
                if not report.ready["ok"]:
                    return run.end(failure_reason=not_ready_reason(report.ready))
            return run.end(
                "idempotent_no_op",
                descriptors_reused=len(selection.tiles),
                engines_reused=len(validated.backbones),
                manifest_path=str(root / MANIFEST_NAME),
            )
        # Only a build with work to do loads the engine runtime and faiss (in the
        # background, while the engines are settled) and the tasks that use them.
        preload(validated.backend.runtime, "faiss")
        from takeoff_cache_prefect.tasks import descriptors as td
        from takeoff_cache_prefect.tasks import engines as te
        from takeoff_cache_prefect.tasks import features as tf
        from takeoff_cache_prefect.tasks import selftest as ts

        run.callback(td.settle_progress)  # after the lock is released
        with run.phase("staging"):
            staging = t.open_staging(validated, run)
        with run.phase("engines"):
            records, described, staged = te.engines(validated, options.work_dir, staging)
            report.precision_drift = te.int8_drift(validated, records, options.work_dir)
        report.engines_built = sum(r.built for r in records)
        report.engines_reused = len(records) - report.engines_built
        with run.phase("descriptors"):
            generated, index_described, index_staged = td.descriptors(
                validated, selection, records, options, staging
            )
        report.descriptors_generated = generated
        report.descriptors_reused = len(selection.tiles) - generated
        described += index_described
        staged += index_staged
        with run.phase("features"):
            built = tf.features(validated, untracked(selection), records, options.work_dir)
        report.local_features = tf.report_figures(built)
        described.append(built.artifact)
        staged.append(built.staged)
        with run.phase("self_test"):
            tested = ts.self_test(
                validated,
                selection,
                records,
                index_described,
                options,
                report.build_identity,
                built.work_file,
            )
        report.self_test, report.coverage_map = tested.summary, tested.coverage_map
        with run.phase("readiness"):
            report.ready = t.readiness(validated, selection, options, tested.summary, tested)
        if options.gated and not report.ready["ok"]:
            # Before anything is signed: the previous cache stays in force (exit 12).
            return run.end(failure_reason=not_ready_reason(report.ready))
        if tested.failure_reason:
            return run.end(failure_reason=tested.failure_reason)
        with run.phase("manifest"):
            manifest = t.manifest(
                validated,
                report.build_identity,
                untracked(selection),
                described,
                options,
                tested,
                report.ready,
            )
        with run.phase("coverage"):
            new_paths = {a.path for a in described}
            offending = t.coverage_check(validated, new_paths, previous, options.strict)
        report.warnings += [f"coverage: {p} is not listed in the manifest" for p in offending]
        with run.phase("commit"):
            t.commit_cache(validated, manifest, staged, previous, new_paths)
        with run.phase("prune"):
            td.prune_work_folder(options.work_dir)
            tf.prune_features_folder(options.work_dir)
        return run.end("success", manifest_path=str(root / MANIFEST_NAME))
    # Reached only when bad tiles ended the descriptors phase: a soft failure.
    return run.end("failure")
