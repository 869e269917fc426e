"""The prepare-flight flow: a flight to a verified takeoff cache (SPEC §10).

Phases, each a task but the build: resolve the flight and its area, take the
corpus's workstation lock, download what the corpus lacks, build (the
build-cache flow, as a subflow: the UI shows it under this run), verify. The
report names the phase that stopped; its figures are the command line's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.states import Failed
from takeoff_cache_prefect.flows.build import build_cache
from takeoff_cache_prefect.flows.phases import recorded_outcomes, report_of
from takeoff_cache_prefect.tasks import prepare as t

from takeoff_cache.build.options import OPTION_FIELDS, for_prepare
from takeoff_cache.build.request import FIELDS
from takeoff_cache.companion.options import CompanionOptions
from takeoff_cache.errors import NotReadyError, RemoteCommandError, TakeoffCacheError
from takeoff_cache.prepare import job as p
from takeoff_cache.prepare.download import DownloadOptions
from takeoff_cache.prepare.precheck import precheck
from takeoff_cache.prepare.report import PrepareReport
from takeoff_cache.tiles.area import DEFAULT_BUFFER_M
from takeoff_cache_prefect.artifacts import artifact_key
from takeoff_cache_prefect.results import json_parameters

# The build's own failure code ("failure" outcome); its typed errors keep theirs.
EXIT_BUILD_FAILED = 3

# The report of each run, and the error that ended it, for a caller in this process.
_prepared: ContextVar[list[tuple[PrepareReport, TakeoffCacheError | None]] | None] = ContextVar(
    "prepare_flight_outcomes", default=None
)


@contextmanager
def recorded_prepares() -> Iterator[list[tuple[PrepareReport, TakeoffCacheError | None]]]:
    outcomes: list[tuple[PrepareReport, TakeoffCacheError | None]] = []
    token = _prepared.set(outcomes)
    try:
        yield outcomes
    finally:
        _prepared.reset(token)


@json_parameters
@flow(name="prepare-flight", validate_parameters=False, persist_result=False, log_prints=False)
def prepare_flight(
    plan: str | None = None,
    flight: dict[str, Any] | None = None,
    flights_api: str | None = None,
    tiles_url: str | None = None,
    tiles_key_header: str | None = None,
    tiles_key_param: str | None = None,
    buffer_m: float = DEFAULT_BUFFER_M,
    max_age_days: float | None = None,
    max_tiles: int = DownloadOptions.max_tiles,
    dry_run: bool = False,
    companion: dict[str, Any] | None = None,
    work_pool: str | None = None,
    corpus: str | None = None,
    zoom_levels: list[int] | str | None = None,
    sector_class: str | None = None,
    backbones: str | None = None,
    precision: str = "fp32",
    calibration: str | None = None,
    cache_root: str | None = None,
    key: str | None = None,
    trust: str | None = None,
    flight_id: str | None = None,
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
    """Resolve a flight, fetch its area's tiles, build and verify its cache; return the report.

    ``flight`` is a resolved flight (the JSON flight shape, as the command line
    passes it); without it, ``plan`` or ``flight_id`` with ``flights_api`` name one.
    ``companion`` (its options, :class:`CompanionOptions`) builds and verifies on
    the drone's companion computer over SSH instead of here; ``work_pool`` runs
    the build as that pool's build-cache deployment (its worker on the companion),
    with paths as they are there.
    Secrets never come as parameters: the tile API key, the flights token and the
    key passphrase are read from this process's environment where they are used.
    """
    params = dict(locals())
    report = PrepareReport()
    try:
        with ExitStack() as run:
            return _prepare(params, report, run)
    except TakeoffCacheError as exc:
        report.fail(exc.exit_code, str(exc))
        if isinstance(exc, RemoteCommandError) and exc.report:
            report.build = exc.report  # the companion's own report of what failed
            ready = exc.report.get("ready")
            report.ready = ready if isinstance(ready, dict) else None
        # One line in the run's log and state, as the command line prints it: not
        # a traceback for what is an operator's to fix (a missing secret, a bad plan).
        get_run_logger().error("%s: %s", report.phase, exc)
        return Failed(message=f"{report.phase}: {exc}", data=_end(report, exc))


def _prepare(
    params: dict[str, Any], report: PrepareReport, run: ExitStack
) -> dict[str, Any] | State:
    job_args = {name: params[name] for name in p.JOB_PARAMETERS}
    if not params["dry_run"]:
        # A run started from the UI or a deployment gets the command line's checks:
        # every missing field and secret at once, before the first request.
        companion, pool = params["companion"], params["work_pool"]
        precheck(
            {name: params[name] for name in FIELDS if name in params},
            job_args,
            companion=companion is not None,
            pool=bool(pool),
            backend=params["backend"],
            work_dir=_existing(params["work_dir"]),
        )
    with _phase(report, "resolve"):
        job = t.resolve(job_args)
    report.resolved(job)
    if params["dry_run"]:
        report.download = p.dry_run(job.corpus, job.mission, job.options)
        report.outcome = "dry_run"
        return _end(report)
    with _phase(report, "lock"):
        if job.source is not None:
            p.check_job_size(job.corpus, job.mission, job.options)
        report.lock = t.lock(job, run)
    with _phase(report, "download"):
        report.download = t.download(job)
        report.area = {**job.mission.to_json(), "path": t.write_area(job)}
    fields = {name: params[name] for name in FIELDS if name in params}
    # The build is judged as prepare judges: not ready stops it (exit 12), with
    # protective thresholds unless the operator gave their own (SPEC §11).
    options = for_prepare({f.name: params[f.name] for f in OPTION_FIELDS})
    companion = CompanionOptions.from_json(params["companion"]) if params["companion"] else None
    pool = params["work_pool"]
    if companion is not None and not pool:
        with _phase(report, "companion"):
            done = t.companion_build(job, fields, companion, options)
        report.companion = {"bring_up": done["bring_up"], "transfer": done["transfer"]}
        report.build, report.verify = done["build"], done["verify"]
        report.ready = done["build"].get("ready")
        report.finish(done["build"]["outcome"])
        return _end(report)
    raw = p.build_raw(fields, job.flight, job.mission, job.corpus)
    sent = None
    if companion is not None:
        # The pool's worker is on the companion: its inputs go over SSH first.
        with _phase(report, "companion"):
            sent = t.companion_send(job, fields, companion, params["backend"])
        report.companion = {
            "bring_up": sent.bring_up.to_json(),
            "transfer": asdict(sent.transfer),
        }
        raw, options = sent.request, {**options, "work_dir": sent.bring_up.paths.work_dir}
    if pool:
        with _phase(report, "build"):
            build = t.pool_build({**raw, **options}, pool)
    else:
        with _phase(report, "build"), recorded_outcomes() as outcomes:
            work = {"work_dir": str(job.work)}
            state = build_cache(**raw, **{**options, **work}, return_state=True)
        build = report_of(outcomes, state)
    report.build = build
    report.ready = build.get("ready")
    if report.ready is not None and not report.ready.get("ok"):
        error = NotReadyError(list(report.ready.get("reasons", [])))
        report.fail(error.exit_code, str(error))
        return Failed(message=str(error), data=_end(report))
    if build["outcome"] == "failure":
        report.fail(EXIT_BUILD_FAILED, build["failure_reason"])
        return Failed(message=f"build failed: {build['failure_reason']}", data=_end(report))
    with _phase(report, "verify"):
        manifest = Path(str(build["manifest_path"]))
        if companion is not None and sent is not None:
            report.verify = t.companion_verify(companion, sent, fields.get("trust"))
        elif pool and not manifest.is_file():
            # The worker's paths are its own: the cache is there, not here.
            report.verify = {
                "ok": None,
                "skipped": f"{manifest.parent} is on the worker's machine; verify it there"
                " (with --companion, prepare verifies it over SSH)",
            }
        else:
            report.verify = t.verify(str(manifest.parent), str(params["trust"]))
    report.finish(build["outcome"])
    return _end(report)


def _existing(folder: str | None) -> Path | None:
    """The work folder if it is there already (its checked backbones help); never made."""
    path = Path(folder).expanduser() if folder else None
    return path if path is not None and path.is_dir() else None


@contextmanager
def _phase(report: PrepareReport, name: str) -> Iterator[None]:
    report.phase = name
    start = time.perf_counter()
    try:
        yield
    finally:
        report.phases[name] = round(time.perf_counter() - start, 4)


def _end(report: PrepareReport, error: TakeoffCacheError | None = None) -> dict[str, Any]:
    recorded = _prepared.get()
    if recorded is not None:
        recorded.append((report, error))
    with contextlib.suppress(Exception):  # a lost UI artifact must not change the outcome
        create_markdown_artifact(
            report.markdown(),
            key=artifact_key("prepare-report", Path(report.subject())),
            description="takeoff-cache prepare report",
        )
    return report.to_json()
