"""Prefect tasks of prepare-flight: resolve, lock, download, verify (the build is
the build-cache flow, run as a subflow), or the companion's build and verify."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from takeoff_cache.build.lock import adopt_or_acquire
from takeoff_cache.companion.options import CompanionOptions
from takeoff_cache.companion.session import Sent
from takeoff_cache.core.env import COMPANION_KEY_PASSPHRASE
from takeoff_cache.prepare import job as prepare
from takeoff_cache.prepare.download import DownloadProgress
from takeoff_cache_prefect import context

# How often the download writes its progress to the run log (the UI's view of it).
_LOG_EVERY_S = 10.0


@task(name="resolve", task_run_name="resolve", cache_policy=NO_CACHE, persist_result=False)
def resolve(params: dict[str, Any]) -> prepare.Job:
    return prepare.plan_job(**params)


@task(name="lock", task_run_name="lock", cache_policy=NO_CACHE, persist_result=False)
def lock(job: prepare.Job, run: ExitStack) -> str | None:
    """Hold the corpus's workstation lock until ``run`` ends (adopting the command
    line's, when it took it before the flow started); None for a run that does not
    download, which takes none."""
    if not prepare.downloads(job):
        return None
    lock = prepare.workstation_lock(job.work, job.corpus)
    held = run.enter_context(adopt_or_acquire(lock, context.held_locks.get()))
    return str(held.path)


@task(name="download", task_run_name="download", cache_policy=NO_CACHE, persist_result=False)
def download(job: prepare.Job) -> dict[str, Any]:
    logger = get_run_logger()
    shown = context.download_progress.get()
    logged = [time.monotonic()]

    def progress(state: DownloadProgress) -> None:
        if shown is not None:
            shown(state)
        now = time.monotonic()
        if now - logged[0] >= _LOG_EVERY_S or state.done == state.total:
            logged[0] = now
            logger.info(
                "tiles %d/%d, %d failed, %.0f tiles/s",
                state.done,
                state.total,
                state.failed,
                state.tiles_per_s,
            )

    return prepare.fetch_tiles(job.corpus, job.mission, job.source, job.options, progress)


@task(name="area", task_run_name="area", cache_policy=NO_CACHE, persist_result=False)
def write_area(job: prepare.Job) -> str:
    return str(prepare.write_area(job.work, job.flight, job.mission))


@task(name="verify", task_run_name="verify", cache_policy=NO_CACHE, persist_result=False)
def verify(cache_root: str, trust: str) -> dict[str, Any]:
    return prepare.verify_built(Path(cache_root), Path(trust).expanduser())


def _relay(prefix: str) -> Callable[[str], None]:
    """A line from the companion's side: to the run log, and to the command line's
    stderr when one is watching (``context.companion_lines``)."""
    logger = get_run_logger()
    shown = context.companion_lines.get()

    def relay(line: str) -> None:
        logger.info("%s%s", prefix, line)
        if shown is not None:
            shown(line)

    return relay


@task(name="companion", task_run_name="companion", cache_policy=NO_CACHE, persist_result=False)
def companion_build(
    job: prepare.Job, fields: dict[str, Any], companion: CompanionOptions, options: dict[str, Any]
) -> dict[str, Any]:
    """Bring the companion up, send it the area's tiles and the models, build there
    with the build ``options`` and verify; its progress lines go to the run log (and
    the command line)."""
    from takeoff_cache.companion.session import build_on_companion

    request, tiles = prepare.companion_request(job, fields, companion)
    on_line = _relay("companion: ")
    report = asyncio.run(
        build_on_companion(
            companion.ssh_settings(),
            request,
            tiles,
            companion.paths,
            backend=options["backend"],
            options=options,
            tool=companion.tool,
            on_line=on_line,
            passphrase=os.environ.get(COMPANION_KEY_PASSPHRASE),
            # The workstation's own trust store: the companion's manifest must verify with it.
            trust=fields.get("trust"),
            # The coverage map and the whole report come back to the workstation.
            work_dir=job.work,
        )
    )
    return report.to_json()


_TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@task(name="pool-build", task_run_name="pool-build", cache_policy=NO_CACHE, persist_result=False)
def pool_build(parameters: dict[str, Any], work_pool: str) -> dict[str, Any]:
    """Run the build-cache deployment of ``work_pool`` (its worker is on the companion),
    follow its state and read its report back from its artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    from takeoff_cache.errors import CompanionError, RemoteCommandError
    from takeoff_cache_prefect.artifacts import read_report_block

    say = _relay("")
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["build-cache"])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool])),
        )
        if not deployments:
            raise CompanionError(
                f"work pool {work_pool}: no build-cache deployment in it"
                f" (scripts/deploy.py --pool {work_pool} makes one)"
            )
        name = f"build-cache/{deployments[0].name}"
        run = cast(FlowRun, run_deployment(name, parameters=parameters, timeout=0, as_subflow=True))
        say(f"work pool {work_pool}: {name} run {run.name} {run.id}")
        last = None
        while True:
            state = client.read_flow_run(run.id).state
            if state is not None and state.name != last:
                last = state.name
                say(f"work pool {work_pool}: {run.name}: {state.name}")
            if state is not None and state.type.value in _TERMINAL:
                break
            time.sleep(1.0)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    reports = [r for a in artifacts if (r := read_report_block(str(a.data or "")))]
    if not reports:
        raise RemoteCommandError(
            f"work pool {work_pool}: {run.name} ended {last} without a build report", 11
        )
    report = reports[0]
    if state.type.value != "COMPLETED" and report.get("outcome") != "failure":
        raise RemoteCommandError(
            f"work pool {work_pool}: {run.name} ended {last}: {report.get('failure_reason')}",
            11,
            report,
        )
    return report


@task(
    name="companion-send", task_run_name="companion-send", cache_policy=NO_CACHE,
    persist_result=False,
)  # fmt: skip
def companion_send(
    job: prepare.Job, fields: dict[str, Any], companion: CompanionOptions, backend: str
) -> Sent:
    """Bring the companion up and send it the inputs, for a build its worker runs."""
    from takeoff_cache.companion.session import send_to_companion
    from takeoff_cache.companion.ssh import connect

    request, tiles = prepare.companion_request(job, fields, companion)

    async def send() -> Sent:
        async with connect(companion.ssh_settings()) as conn:
            return await send_to_companion(
                conn, request, tiles, companion.paths, backend=backend, tool=companion.tool
            )

    return asyncio.run(send())


@task(
    name="companion-verify", task_run_name="companion-verify", cache_policy=NO_CACHE,
    persist_result=False,
)  # fmt: skip
def companion_verify(
    companion: CompanionOptions, sent: Sent, trust: str | None = None
) -> dict[str, Any]:
    """``verify --host-check`` there, and with ``trust`` (the workstation's trust store)
    the companion's manifest checked here: trusted, and of the build that was sent."""
    from takeoff_cache.companion.session import verify_on_companion

    return asyncio.run(
        verify_on_companion(
            companion.ssh_settings(),
            sent.bring_up.paths,
            tool=companion.tool,
            trust=trust,
            identity=sent.identity or None,
        )
    )
